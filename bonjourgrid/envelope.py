"""Authenticated control messages: HMAC with the grid key, timestamp and nonce.

Every message between nodes (recruit requests, task offers, results, CE bus
traffic) travels sealed in an envelope. `Opener` refuses, with a reason a log
line can name, anything forged, replayed, stale, oversized or malformed.

Wire format: 16-byte truncated HMAC-SHA256, then compact JSON:
    {"v":1,"grid":..,"kind":..,"from":..,"ts":<ms>,"nonce":<hex>,"ce":..,"epoch":..,"body":{..}}
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .gridkey import GridKey, sign, verify

SIG_BYTES = 16
MAX_MESSAGE_BYTES = 8 << 20
DEFAULT_WINDOW_S = 60.0  # accepted clock difference between two desktops
MAX_NONCES = 200_000


class BadMessage(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    kind: str
    sender: str
    body: dict[str, Any] = field(default_factory=dict)
    ce: str | None = None
    epoch: int | None = None
    ts_ms: int = 0
    nonce: str = ""


def new_nonce() -> str:
    return secrets.token_hex(12)


def seal(key: GridKey, grid: str, env: Envelope, now: float) -> bytes:
    doc = {
        "v": 1,
        "grid": grid,
        "kind": env.kind,
        "from": env.sender,
        "ts": int(now * 1000),
        "nonce": env.nonce or new_nonce(),
        "ce": env.ce,
        "epoch": env.epoch,
        "body": env.body,
    }
    payload = json.dumps(doc, separators=(",", ":")).encode()
    return sign(key.derive("msg"), payload, SIG_BYTES) + payload


class Opener:
    """Verifies envelopes for one grid; remembers nonces for the replay window."""

    def __init__(
        self, key: GridKey, grid: str, window_s: float = DEFAULT_WINDOW_S, max_bytes: int = MAX_MESSAGE_BYTES
    ) -> None:
        self._key = key.derive("msg")
        self.grid = grid
        self.window_ms = int(window_s * 1000)
        self.max_bytes = max_bytes
        self._seen: OrderedDict[str, int] = OrderedDict()  # nonce -> ts, oldest first

    def open(self, data: bytes, now: float) -> Envelope:
        if len(data) > self.max_bytes:
            raise BadMessage("oversized", f"{len(data)} bytes")
        if len(data) <= SIG_BYTES:
            raise BadMessage("malformed", "too short")
        sig, payload = data[:SIG_BYTES], data[SIG_BYTES:]
        if not verify(self._key, payload, sig, SIG_BYTES):
            raise BadMessage("bad-signature")
        try:
            doc = json.loads(payload)
            if not isinstance(doc, dict) or doc.get("v") != 1:
                raise ValueError("not a version 1 envelope")
            env = Envelope(
                kind=_str(doc["kind"]),
                sender=_str(doc["from"]),
                body=doc["body"] if isinstance(doc["body"], dict) else _fail("body"),
                ce=None if doc.get("ce") is None else _str(doc["ce"]),
                epoch=None if doc.get("epoch") is None else _int(doc["epoch"]),
                ts_ms=_int(doc["ts"]),
                nonce=_str(doc["nonce"]),
            )
            grid = doc["grid"]
        except (ValueError, KeyError, TypeError) as e:
            raise BadMessage("malformed", str(e)[:80]) from None
        if grid != self.grid:
            raise BadMessage("other-grid", str(grid)[:40])
        now_ms = int(now * 1000)
        if abs(now_ms - env.ts_ms) > self.window_ms:
            raise BadMessage("stale", f"timestamp {(env.ts_ms - now_ms) / 1000:+.1f} s from now")
        if env.nonce in self._seen:
            raise BadMessage("replayed", env.nonce)
        self._remember(env.nonce, env.ts_ms, now_ms)
        return env

    def _remember(self, nonce: str, ts_ms: int, now_ms: int) -> None:
        seen = self._seen
        seen[nonce] = ts_ms
        # Nonces older than the window can go: their timestamps alone now refuse them.
        while seen and (len(seen) > MAX_NONCES or next(iter(seen.values())) < now_ms - 2 * self.window_ms):
            seen.popitem(last=False)


def _str(v: object) -> str:
    if not isinstance(v, str) or len(v) > 256:
        raise ValueError("expected a short string")
    return v


def _int(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError("expected an integer")
    return v


def _fail(what: str) -> dict[str, Any]:
    raise ValueError(f"bad {what}")
