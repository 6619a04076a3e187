"""What a node says about itself in its DNS-SD TXT record, and how a reader checks it.

A TXT record is a bag of short `key=value` strings that anyone on the LAN can
send. Everything read from one is validated (charset, range, size) and the
whole record is authenticated: an HMAC over the service type, the instance
name and every field, so that a signed Idle record cannot be replayed as a
Coordinator one, nor one node's record under another node's name.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum

from .gridkey import GridKey, sign, verify

PROTOCOL_VERSION = 1
# RFC 6763 §6.2: keep TXT records small (ideally < 200 bytes, < 1300 to fit a packet).
MAX_TXT_BYTES = 1300
MAX_TXT_KEYS = 40
MAX_CAPS = 32
# Clocks of desktops drift; a record from "the future" beyond this is refused.
MAX_CLOCK_SKEW_MS = 300_000

GRID_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
NODE_ID_RE = re.compile(r"^[0-9a-f]{16}$")
CE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
CAP_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,40}(=[A-Za-z0-9_.+:/-]{1,60})?$")
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
WORD_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,32}$")
ENDPOINT_RE = re.compile(r"^[a-z]+://[A-Za-z0-9_.:\[\]-]{1,80}$")


class Role(StrEnum):
    IDLE = "idle"
    WORKER = "worker"
    COORDINATOR = "coordinator"


# DNS-SD service names are at most 15 characters (RFC 6763 §7.2).
SERVICE_TYPES: dict[Role, str] = {
    Role.IDLE: "_bg-idle._tcp.local.",
    Role.WORKER: "_bg-worker._tcp.local.",
    Role.COORDINATOR: "_bg-coord._tcp.local.",
}
ROLE_OF_TYPE = {t: r for r, t in SERVICE_TYPES.items()}


class Rejected(Exception):
    """An announcement that must be ignored; `reason` is a short counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Announcement:
    grid: str
    node_id: str
    host: str
    role: Role
    cpus: int
    memory_mib: int
    free_slots: int
    free_memory_mib: int
    load: float
    os: str
    arch: str
    caps: tuple[str, ...] = ()
    ce: str | None = None
    coordinator: str | None = None  # node id of the CE's coordinator (workers)
    epoch: int | None = None  # CE epoch (coordinators)
    bus: str | None = None  # CE bus endpoint, e.g. mqtt://10.0.0.2:1883 (coordinators)
    data: str | None = None  # CE data endpoint, e.g. http://10.0.0.2:8080 (coordinators)
    timestamp_ms: int = 0
    version: int = PROTOCOL_VERSION
    extra: dict[str, str] = field(default_factory=dict)  # unknown keys from newer versions

    @property
    def service_type(self) -> str:
        return SERVICE_TYPES[self.role]

    @property
    def instance_name(self) -> str:
        return f"{self.node_id}.{self.service_type}"

    @staticmethod
    def node_id_of(instance_name: str) -> str:
        """The node an instance name (`instance_name`'s form) is of, without reading its record."""
        return instance_name.split(".", 1)[0]

    # -- encoding ------------------------------------------------------------

    def fields(self) -> dict[str, str]:
        f = {
            "v": str(self.version),
            "grid": self.grid,
            "id": self.node_id,
            "host": self.host,
            "st": self.role.value,
            "cpus": str(self.cpus),
            "mem": str(self.memory_mib),
            "slots": str(self.free_slots),
            "fmem": str(self.free_memory_mib),
            "load": f"{self.load:.2f}",
            "os": self.os,
            "arch": self.arch,
            "caps": ",".join(self.caps),
            "ts": str(self.timestamp_ms),
        }
        for k in ("ce", "coordinator", "epoch", "bus", "data"):
            v = getattr(self, k)
            if v is not None:
                f[_SHORT.get(k, k)] = str(v)
        f.update(self.extra)
        return f

    def to_txt(self, key: GridKey) -> dict[str, str]:
        """The signed TXT record, ready for zeroconf."""
        f = self.fields()
        f["kid"] = key.key_id
        f["sig"] = _b64(sign(key.derive("txt"), _signed_bytes(self.service_type, self.node_id, f)))
        size = sum(len(k) + len(v) + 2 for k, v in f.items())
        if size > MAX_TXT_BYTES:
            raise ValueError(f"TXT record of {size} bytes exceeds {MAX_TXT_BYTES}; use fewer or shorter tags")
        return f


_SHORT = {"coordinator": "coord", "epoch": "ep"}
_KNOWN = {"v", "grid", "id", "host", "st", "cpus", "mem", "slots", "fmem", "load", "os", "arch", "caps",
          "ts", "ce", "coord", "ep", "bus", "data", "kid", "sig"}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signed_bytes(service_type: str, instance: str, f: dict[str, str]) -> bytes:
    body = "\n".join(f"{k}={f[k]}" for k in sorted(f) if k != "sig")
    return f"{service_type}\n{instance}\n{body}".encode()


# -- decoding ----------------------------------------------------------------


def decode_txt(raw: dict[bytes, bytes | None]) -> dict[str, str]:
    """Bytes from the wire to strings, refusing what no honest node sends."""
    if len(raw) > MAX_TXT_KEYS:
        raise Rejected("malformed", f"{len(raw)} TXT keys")
    size = sum(len(k) + len(v or b"") + 2 for k, v in raw.items())
    if size > MAX_TXT_BYTES:
        raise Rejected("oversized", f"{size} bytes")
    out: dict[str, str] = {}
    for k, v in raw.items():
        try:
            ks, vs = k.decode("ascii"), (v or b"").decode("utf-8")
        except UnicodeDecodeError:
            raise Rejected("malformed", "TXT is not text") from None
        out[ks.lower()] = vs
    return out


def parse_announcement(
    service_type: str,
    instance_name: str,
    raw: dict[bytes, bytes | None],
    key: GridKey,
    grid: str,
    now_ms: int,
) -> Announcement:
    """Validate and authenticate one TXT record; raise Rejected with a reason otherwise."""
    f = decode_txt(raw)
    if f.get("grid") != grid:
        raise Rejected("other-grid", repr(f.get("grid", ""))[:40])
    role = ROLE_OF_TYPE.get(service_type)
    if role is None:
        raise Rejected("malformed", f"service type {service_type!r}")
    node_id = f.get("id", "")
    if not NODE_ID_RE.match(node_id) or instance_name != f"{node_id}.{service_type}":
        raise Rejected("malformed", "node id does not match the instance name")
    if f.get("kid") != key.key_id:
        raise Rejected("wrong-key", f"key id {f.get('kid', '')[:16]!r}")
    try:
        sig = _unb64(f.get("sig", ""))
    except (ValueError, TypeError):
        raise Rejected("bad-signature", "undecodable") from None
    if not verify(key.derive("txt"), _signed_bytes(service_type, node_id, f), sig):
        raise Rejected("bad-signature", node_id)
    # Authentic from here on: a peer with the key is trusted to be honest,
    # but a buggy one must still not crash us, so keep validating.
    try:
        version = int(f["v"])
        if version < 1:
            raise ValueError
        if f["st"] != role.value:
            raise ValueError("state does not match the service type")
        ann = Announcement(
            grid=grid,
            node_id=node_id,
            host=_match(HOST_RE, f["host"], "host"),
            role=role,
            cpus=_int(f["cpus"], 0, 4096),
            memory_mib=_int(f["mem"], 0, 1 << 30),
            free_slots=_int(f["slots"], 0, 4096),
            free_memory_mib=_int(f["fmem"], 0, 1 << 30),
            load=_float(f["load"], 0.0, 1e4),
            os=_match(WORD_RE, f["os"], "os"),
            arch=_match(WORD_RE, f["arch"], "arch"),
            caps=_caps(f.get("caps", "")),
            ce=_opt(CE_ID_RE, f.get("ce"), "ce"),
            coordinator=_opt(NODE_ID_RE, f.get("coord"), "coord"),
            epoch=_int(f["ep"], 0, 1 << 62) if "ep" in f else None,
            bus=_opt(ENDPOINT_RE, f.get("bus"), "bus"),
            data=_opt(ENDPOINT_RE, f.get("data"), "data"),
            timestamp_ms=_int(f["ts"], 0, 1 << 62),
            version=version,
            extra={k: v for k, v in f.items() if k not in _KNOWN},
        )
    except KeyError as e:
        raise Rejected("malformed", f"missing field {e.args[0]}") from None
    except ValueError as e:
        raise Rejected("malformed", str(e)) from None
    if ann.timestamp_ms > now_ms + MAX_CLOCK_SKEW_MS:
        raise Rejected("future", f"{(ann.timestamp_ms - now_ms) / 1000:.0f} s ahead")
    if role is not Role.IDLE and ann.ce is None:
        raise Rejected("malformed", f"a {role.value} must name its CE")
    return ann


def _int(text: str, lo: int, hi: int) -> int:
    if not text.isdigit() or len(text) > 20:
        raise ValueError(f"not a number: {text[:20]!r}")
    v = int(text)
    if not lo <= v <= hi:
        raise ValueError(f"out of range: {v}")
    return v


def _float(text: str, lo: float, hi: float) -> float:
    if len(text) > 20:
        raise ValueError("number too long")
    v = float(text)
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"out of range: {text!r}")
    return v


def _match(rx: re.Pattern[str], text: str, name: str) -> str:
    if not rx.match(text):
        raise ValueError(f"bad {name}: {text[:40]!r}")
    return text


def _opt(rx: re.Pattern[str], text: str | None, name: str) -> str | None:
    return None if text is None else _match(rx, text, name)


def _caps(text: str) -> tuple[str, ...]:
    if not text:
        return ()
    caps = text.split(",")
    if len(caps) > MAX_CAPS:
        raise ValueError(f"{len(caps)} capabilities")
    return tuple(_match(CAP_RE, c, "capability") for c in caps)


def with_timestamp(ann: Announcement, now_ms: int) -> Announcement:
    return replace(ann, timestamp_ms=now_ms)
