"""Where BonjourGrid keeps its files by default (XDG base directories)."""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def default_key_file() -> Path:
    return _xdg("XDG_CONFIG_HOME", ".config") / "bonjourgrid" / "grid.key"


def default_state_dir() -> Path:
    return _xdg("XDG_STATE_HOME", ".local/state") / "bonjourgrid" / "node"
