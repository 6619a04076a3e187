"""A small GUI-RPC client for the local BOINC client (framing and auth sans-I/O, one asyncio connection).

The protocol: XML requests in `<boinc_gui_rpc_request>`, each message ended
by byte 0x03; authentication is `<auth1/>` -> nonce, then `<auth2>` with
md5(nonce + password). About 60 lines, so no third-party wrapper.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import escape

END = b"\x03"


def frame(body: str) -> bytes:
    return f"<boinc_gui_rpc_request>\n{body}\n</boinc_gui_rpc_request>\n".encode() + END


def nonce_of(reply: bytes) -> str:
    m = re.search(rb"<nonce>([^<]*)</nonce>", reply)
    if not m:
        raise GuiRpcError("no nonce in the auth1 reply")
    return m.group(1).decode()


def auth2(nonce: str, password: str) -> str:
    return f"<auth2>\n<nonce_hash>{hashlib.md5((nonce + password).encode()).hexdigest()}</nonce_hash>\n</auth2>"


def check(reply: bytes) -> bytes:
    if b"<unauthorized" in reply or b"<error>" in reply:
        raise GuiRpcError(reply.decode(errors="replace").strip())
    return reply


@dataclass(frozen=True)
class Held:
    """A result the client holds: its name and BOINC state (5 = output uploaded)."""

    name: str
    state: int


def held_results(reply: bytes, project_url: str) -> list[Held]:
    """The results the client holds for a project and the server has not acknowledged yet."""
    body = reply.rstrip(END).strip()
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise GuiRpcError(f"unreadable get_results reply: {e}") from e
    held = []
    for r in root.iter("result"):
        url = (r.findtext("project_url") or "").strip()
        name = (r.findtext("name") or "").strip()
        try:
            state = int((r.findtext("state") or "0").strip())
        except ValueError:
            state = 0
        if name and url == project_url and r.find("got_server_ack") is None:
            held.append(Held(name, state))
    return held


class GuiRpcError(Exception):
    pass


class GuiRpc:
    def __init__(self, host: str, port: int, password: str) -> None:
        self.host, self.port, self.password = host, port, password
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def connect(self, timeout: float = 5.0) -> None:
        self._reader, self._writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout)
        nonce = nonce_of(await self._call("<auth1/>"))
        reply = await self._call(auth2(nonce, self.password))
        if b"<authorized/>" not in reply:
            raise GuiRpcError("GUI-RPC password refused")

    async def _call(self, body: str, timeout: float = 10.0) -> bytes:
        assert self._reader is not None and self._writer is not None
        async with self._lock:
            self._writer.write(frame(body))
            await self._writer.drain()
            return check(await asyncio.wait_for(self._reader.readuntil(END), timeout))

    async def request(self, body: str) -> bytes:
        if self._writer is None:
            await self.connect()
        return await self._call(body)

    async def project_op(self, url: str, op: str) -> bytes:
        """op: update, detach, suspend, resume, nomorework, ..."""
        return await self.request(f"<project_{op}>\n<project_url>{escape(url)}</project_url>\n</project_{op}>")

    async def run_mode_always(self) -> None:
        for what in ("run_mode", "network_mode"):
            await self.request(f"<set_{what}>\n<always/>\n<duration>0</duration>\n</set_{what}>")

    async def results(self, project_url: str) -> list[Held]:
        return held_results(await self.request("<get_results>\n<active_only>0</active_only>\n</get_results>"),
                            project_url)

    async def quit(self) -> None:
        await self.request("<quit/>")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._reader = self._writer = None
