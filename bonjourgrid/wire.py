"""Length-prefixed sealed envelopes over TCP: the node's control channel."""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import replace

from .envelope import MAX_MESSAGE_BYTES, BadMessage, Envelope, Opener, new_nonce, seal
from .gridkey import GridKey

_LEN = struct.Struct("!I")


async def read_frame(reader: asyncio.StreamReader, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    (n,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if n > max_bytes:
        raise BadMessage("oversized", f"frame of {n} bytes")
    return await reader.readexactly(n)


def frame(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


async def request(
    host: str, port: int, key: GridKey, grid: str, env: Envelope, timeout: float = 5.0
) -> Envelope:
    """One authenticated request/response exchange with a node.

    The reply must name our nonce (`re`), so an old reply cannot be replayed to us.
    """
    env = replace(env, nonce=new_nonce())

    async def exchange() -> Envelope:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(frame(seal(key, grid, env, time.time())))
            await writer.drain()
            reply = Opener(key, grid).open(await read_frame(reader), time.time())
            if reply.body.get("re") != env.nonce:
                raise BadMessage("replayed", "reply to another request")
            return reply
        finally:
            writer.close()

    return await asyncio.wait_for(exchange(), timeout)
