"""Which addresses a node listens and announces on (ifaddr, as zeroconf itself uses)."""

from __future__ import annotations

import ipaddress

import ifaddr


class InterfaceError(ValueError):
    pass


def ipv4_interfaces() -> dict[str, list[str]]:
    """Adapter name -> its IPv4 addresses."""
    out: dict[str, list[str]] = {}
    for adapter in ifaddr.get_adapters():
        ips = [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
        if ips:
            out[adapter.nice_name] = ips
    return out


def resolve_interface(choice: str | None) -> list[str]:
    """The IPv4 addresses to use for `--interface` (an address or an adapter name).

    With no choice: every non-loopback IPv4 address, or loopback alone when
    that is all there is (a single-host grid, or a test namespace).
    """
    interfaces = ipv4_interfaces()
    if choice is None:
        addrs = [a for ips in interfaces.values() for a in ips if not ipaddress.ip_address(a).is_loopback]
        return addrs or [a for ips in interfaces.values() for a in ips]
    if choice in interfaces:
        return interfaces[choice]
    try:
        ipaddress.IPv4Address(choice)
    except ValueError:
        raise InterfaceError(
            f"no interface or IPv4 address {choice!r}; known: "
            + ", ".join(f"{n} ({', '.join(ips)})" for n, ips in sorted(interfaces.items()))
        ) from None
    if not any(choice in ips for ips in interfaces.values()):
        raise InterfaceError(f"{choice} is not an address of this machine")
    return [choice]
