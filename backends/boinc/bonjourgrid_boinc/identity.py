"""What a coordinator and its successor derive alike from the grid key and the CE id (failover-ready)."""

from __future__ import annotations

import re
import zlib

from bonjourgrid.gridkey import GridKey

PORT_BASE, PORT_SPAN = 20000, 20000


def authenticator(key: GridKey, ce: str) -> str:
    return key.derive(f"boinc-authenticator/{ce}").hex()[:32]


def workunit_key(key: GridKey, ce: str) -> bytes:
    """HMAC key for workunit commands: only grid members can make a worker's wrapper run something."""
    return key.derive(f"boinc-workunit/{ce}")


def project_port(key: GridKey, ce: str) -> int:
    return PORT_BASE + int.from_bytes(key.derive(f"boinc-port/{ce}")[:4], "big") % PORT_SPAN


def project_url(address: str, port: int, ce: str) -> str:
    return f"http://{address}:{port}/{ce}/"


_HOST = re.compile(r"(?:[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?")


def url_for_host(host: str | None, ce: str, fallback: str) -> str:
    """The project URL as the client addressed it (its Host header): a worker's relay, or us directly.

    Replies must name this URL (the client compares `<master_url>` with what it attached to); a
    missing or malformed Host gives `fallback`.
    """
    if host is None or not _HOST.fullmatch(host):
        return fallback
    return f"http://{host}/{ce}/"


def host_id(node_id: str) -> int:
    return (zlib.crc32(node_id.encode()) & 0x7FFFFFFF) or 1


def project_dir_name(url: str) -> str:
    """The client's directory for a project (client `escape_project_url`): scheme dropped, odd chars '_'."""
    rest = url.split("://", 1)[-1]
    return re.sub(r"[^A-Za-z0-9.\-_]", "_", rest).rstrip("_")
