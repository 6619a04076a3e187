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


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` in one step: a crash or a full disk leaves the old file or the new, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
