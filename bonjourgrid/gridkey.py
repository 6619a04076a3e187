"""The grid key: the one shared secret that defines a grid.

Every desktop of a grid holds the same 256-bit key. It never travels on the
network; announcements and control messages carry HMACs made with keys
derived from it, one per purpose, so that a signature made for one purpose
can never be replayed as another.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

KEY_BYTES = 32
_FILE_HEADER = "bonjourgrid-key-v1"


class GridKeyError(Exception):
    """The key file is missing, unreadable or malformed; the message says which and what to do."""


@dataclass(frozen=True)
class GridKey:
    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise GridKeyError(f"a grid key has {KEY_BYTES} bytes, got {len(self.secret)}")

    @classmethod
    def generate(cls) -> GridKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    def derive(self, purpose: str) -> bytes:
        """A sub-key bound to one purpose (domain separation)."""
        return hmac.new(self.secret, b"bonjourgrid/" + purpose.encode(), hashlib.sha256).digest()

    @property
    def key_id(self) -> str:
        """A short public fingerprint: tells 'another grid's key' apart from 'forged'."""
        return self.derive("key-id").hex()[:8]

    def __repr__(self) -> str:  # never print the secret by accident
        return f"GridKey(id={self.key_id})"

    # -- files -------------------------------------------------------------

    def write(self, path: Path, *, overwrite: bool = False) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise GridKeyError(
                f"{path} already exists; keep it, or pass --force to replace it "
                "(every node of the grid then needs the new key)"
            ) from None
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(f"{_FILE_HEADER} {self.secret.hex()}\n")

    @classmethod
    def read(cls, path: Path) -> GridKey:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise GridKeyError(
                f"no grid key at {path}: run `bonjourgrid init` on one machine and copy "
                "the file to the same place on every node (or pass --key-file)"
            ) from None
        except (PermissionError, IsADirectoryError) as e:
            raise GridKeyError(f"cannot read grid key {path}: {e.strerror}") from None
        parts = text.split()
        if len(parts) != 2 or parts[0] != _FILE_HEADER:
            raise GridKeyError(f"{path} is not a BonjourGrid key file (expected '{_FILE_HEADER} <hex>')")
        try:
            secret = bytes.fromhex(parts[1])
        except ValueError:
            raise GridKeyError(f"{path}: the key is not hexadecimal") from None
        if len(secret) != KEY_BYTES:
            raise GridKeyError(f"{path}: the key has {len(secret)} bytes, expected {KEY_BYTES}")
        return cls(secret)


def key_file_is_private(path: Path) -> bool:
    """False when group or others may read the key (the caller warns)."""
    return not (Path(path).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def sign(key: bytes, payload: bytes, size: int = 16) -> bytes:
    """HMAC-SHA256, truncated: 128 bits is ample against forgery and keeps TXT records small."""
    return hmac.new(key, payload, hashlib.sha256).digest()[:size]


def verify(key: bytes, payload: bytes, signature: bytes, size: int = 16) -> bool:
    """Constant-time check; a truncated signature never passes."""
    return len(signature) == size and hmac.compare_digest(sign(key, payload, size), signature)
