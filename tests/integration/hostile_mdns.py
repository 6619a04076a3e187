"""A hostile host on the LAN, for tests: sends garbage and forged DNS-SD records.

Run inside a testbed host: `python hostile_mdns.py garbage|forged|wrongkey SECONDS`.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import sys
import time

from zeroconf import DNSAddress, DNSOutgoing, DNSPointer, DNSService, DNSText, IPVersion, const
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from bonjourgrid.announcement import SERVICE_TYPES, Announcement, Role
from bonjourgrid.gridkey import GridKey
from bonjourgrid.netif import resolve_interface

IDLE = SERVICE_TYPES[Role.IDLE]
GROUP = ("224.0.0.251", 5353)


def sock(addr: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    return s


def response(instance: str, txt: bytes, addr: str) -> bytes:
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
    now = int(time.time() * 1000)
    out.add_answer_at_time(DNSPointer(IDLE, const._TYPE_PTR, const._CLASS_IN, 120, instance), now)
    out.add_answer_at_time(DNSService(instance, const._TYPE_SRV, const._CLASS_IN, 120, 0, 0, 4000, "evil.local."), now)
    out.add_answer_at_time(DNSText(instance, const._TYPE_TXT, const._CLASS_IN, 120, txt), now)
    out.add_answer_at_time(DNSAddress("evil.local.", const._TYPE_A, const._CLASS_IN, 120, socket.inet_aton(addr)), now)
    return out.packets()[0]


def txt_bytes(pairs: list[bytes]) -> bytes:
    return b"".join(bytes([min(len(p), 255)]) + p[:255] for p in pairs)


def garbage(addr: str, seconds: float) -> None:
    s, rng = sock(addr), random.Random(1)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        packets = [
            os.urandom(rng.randint(0, 1500)),
            struct.pack("!6H", 0, 0x8400, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF),  # header claims 65535 records
            struct.pack("!6H", 0, 0x8400, 0, 1, 0, 0) + b"\xc0\x0c" * 4,  # compression pointer loop
            response(f"{'f' * 16}.{IDLE}", txt_bytes([b"grid=default", b"\xff\xfe\xfd=\x00", b"sig"]), addr),
            response(f"{'e' * 16}.{IDLE}", txt_bytes([b"grid=default"] + [b"x" * 250] * 30), addr),
            response(f"{'d' * 16}.{IDLE}", txt_bytes([f"k{i}=v".encode() for i in range(200)]), addr),
            response(f"{'c' * 16}.{IDLE}", b"\x40garbage-length", addr),
        ]
        for p in packets:
            s.sendto(p, GROUP)
            n += 1
        time.sleep(0.02)
    print(f"sent {n} hostile packets", flush=True)


async def wrongkey(addr: str, seconds: float) -> None:
    """A node of the same grid name, signed with another key."""
    azc = AsyncZeroconf(interfaces=[addr], ip_version=IPVersion.V4Only)
    ann = Announcement(grid="default", node_id="abcdefabcdef0001", host="intruder", role=Role.IDLE, cpus=64,
                       memory_mib=1 << 20, free_slots=64, free_memory_mib=1 << 20, load=0.0, os="linux",
                       arch="x86_64", timestamp_ms=int(time.time() * 1000))
    info = AsyncServiceInfo(ann.service_type, ann.instance_name, port=4000, properties=ann.to_txt(GridKey.generate()),
                            server="intruder.local.", parsed_addresses=[addr])
    await azc.async_register_service(info)
    print("registered", flush=True)
    await asyncio.sleep(seconds)
    await azc.async_close()


async def forged(addr: str, seconds: float) -> None:
    """Copies a real node's signed TXT, changes it, and announces it as its own."""
    azc = AsyncZeroconf(interfaces=[addr], ip_version=IPVersion.V4Only)
    found: list[str] = []
    AsyncServiceBrowser(azc.zeroconf, [IDLE], handlers=[lambda **kw: found.append(kw["name"])])
    while not found:
        await asyncio.sleep(0.1)
    real = AsyncServiceInfo(IDLE, found[0])
    await real.async_request(azc.zeroconf, 3000)
    txt = {k.decode(): (v or b"").decode() for k, v in real.properties.items()}
    txt["cpus"] = "128"  # tampered: claims a big machine
    fake_id = "abcdefabcdef0002"
    txt["id"] = fake_id
    info = AsyncServiceInfo(IDLE, f"{fake_id}.{IDLE}", port=4000, properties=txt, server="forger.local.",
                            parsed_addresses=[addr])
    await azc.async_register_service(info)
    print("registered", flush=True)
    await asyncio.sleep(seconds)
    await azc.async_close()


if __name__ == "__main__":
    mode, seconds = sys.argv[1], float(sys.argv[2])
    address = resolve_interface(None)[0]
    if mode == "garbage":
        garbage(address, seconds)
    else:
        asyncio.run({"wrongkey": wrongkey, "forged": forged}[mode](address, seconds))
