"""The node's one DNS-SD service and its browser of the grid (python-zeroconf, asyncio API).

mDNS here is for discovery and announcements only. A host that dies without a
goodbye stays in every cache for a long time, so liveness is judged
elsewhere (the CE bus heartbeats), never from these records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from zeroconf import (
    DNSPointer,
    DNSQuestionType,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    current_time_millis,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .announcement import SERVICE_TYPES, Announcement
from .gridkey import GridKey
from .gridview import GridView, NodeRecord

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000
MAX_PARALLEL_RESOLVES = 32
# A goodbye leaves a record in caches for one second (RFC 6762 10.1). Then whether it is still there
# says whether the goodbye was the last word on its service (see Browser._settled).
GOODBYE_SETTLE_S = 1.25
# A goodbye for a service its node registered less than this long ago is most likely a late one, for
# the registration before (zeroconf sends goodbyes over 250 ms): `Browser._settled` decides then.
GOODBYE_BURST_S = 0.5
# And, whatever events zeroconf gave or did not give, this often every service the cache holds
# live is made sure to be in the view (`Browser._reconcile`).
RECONCILE_EVERY_S = 2.0
_TYPE_PTR, _TYPE_TXT, _CLASS_IN = 12, 16, 1


def open_zeroconf(addresses: list[str] | None) -> AsyncZeroconf:
    if addresses:
        return AsyncZeroconf(interfaces=addresses, ip_version=IPVersion.V4Only)
    return AsyncZeroconf(ip_version=IPVersion.V4Only)


class DuplicateNodeId(RuntimeError):
    pass


class Publisher:
    """Keeps exactly one service registered: replacing it sends a goodbye for the old one."""

    def __init__(self, azc: AsyncZeroconf, key: GridKey, addresses: list[str], port: int) -> None:
        self.azc = azc
        self.key = key
        self.addresses = addresses
        self.port = port
        self.current: AsyncServiceInfo | None = None
        self._probed = False
        self._goodbyes: list[Awaitable[object]] = []
        self._lock = asyncio.Lock()

    def _info(self, ann: Announcement) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            ann.service_type,
            ann.instance_name,
            port=self.port,
            properties=ann.to_txt(self.key),
            server=f"bg-{ann.node_id}.local.",
            parsed_addresses=self.addresses,
        )

    async def publish(self, ann: Announcement) -> None:
        async with self._lock:
            info = self._info(ann)
            if self.current is not None and self.current.type == info.type:
                self.current = info
                await self.azc.async_update_service(info)
                return
            await self._withdraw()
            try:
                # Probe once, at start, to catch a cloned desktop with a copied
                # node id; later state changes reuse the proven-unique name.
                await self.azc.async_register_service(info, cooperating_responders=self._probed)
            except NonUniqueNameException:
                raise DuplicateNodeId(
                    f"another host already announces node id {ann.node_id}: was this machine cloned "
                    "with its state directory? Remove node-id in the state directory of one of them."
                ) from None
            self._probed = True
            self.current = info

    async def withdraw(self) -> None:
        """Goodbye for the current service."""
        async with self._lock:
            await self._withdraw()

    async def flush(self) -> None:
        """Wait until every goodbye is on the wire (before closing the socket at exit)."""
        while self._goodbyes:
            await self._goodbyes.pop()

    async def _withdraw(self) -> None:
        if self.current is not None:
            info, self.current = self.current, None
            self._goodbyes = [g for g in self._goodbyes if not g.done()]
            self._goodbyes.append(await self.azc.async_unregister_service(info))


class Browser:
    """Browses the three state services and keeps a GridView up to date."""

    def __init__(
        self,
        azc: AsyncZeroconf,
        view: GridView,
        on_change: Callable[[str, NodeRecord | None], None] | None = None,
    ) -> None:
        self.azc = azc
        self.view = view
        self.on_change = on_change
        self._browser: AsyncServiceBrowser | None = None
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._settling: dict[str, asyncio.TimerHandle] = {}
        self._reconciler: asyncio.Task[None] | None = None
        self._again: set[str] = set()  # updated while being resolved: read once more
        self._slots = asyncio.Semaphore(MAX_PARALLEL_RESOLVES)

    async def start(self) -> None:
        # Multicast (QM) questions only: with unicast (QU) ones, the answer goes
        # to whichever process on this host holds port 5353 first (the node
        # daemon, say), and a second browser on the same host hears nothing.
        self._browser = AsyncServiceBrowser(
            self.azc.zeroconf,
            list(SERVICE_TYPES.values()),
            handlers=[self._on_state_change],
            question_type=DNSQuestionType.QM,
        )
        self._reconciler = asyncio.ensure_future(self._reconcile())

    async def stop(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        for task in self._pending.values():
            task.cancel()
        for timer in self._settling.values():
            timer.cancel()
        if self._reconciler is not None:
            self._reconciler.cancel()

    def _on_state_change(
        self, zeroconf: object, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            task = self._pending.pop(name, None)
            self._again.discard(name)
            if task:
                task.cancel()
            current = self.view.nodes.get(Announcement.node_id_of(name))
            if current is None or current.ann.instance_name != name \
                    or time.time() - current.in_service_since >= GOODBYE_BURST_S:
                rec = self.view.remove(name)
                if rec is not None and self.on_change:
                    self.on_change("removed", rec)
            if name in self._settling:
                self._settling.pop(name).cancel()
            self._settling[name] = asyncio.get_running_loop().call_later(
                GOODBYE_SETTLE_S, self._settled, service_type, name)
            return
        if name in self._pending:
            self._again.add(name)  # one resolution per name at a time
            return
        if len(self._pending) >= 4 * MAX_PARALLEL_RESOLVES:
            self.view.dropped["flood"] += 1
            return
        self._pending[name] = asyncio.ensure_future(self._resolve(service_type, name))

    async def _reconcile(self) -> None:
        """A service live in the cache whose node the view lacks gets `_settled` (a safety net)."""
        while True:
            await asyncio.sleep(RECONCILE_EVERY_S)
            try:
                now = current_time_millis()
                for service_type in SERVICE_TYPES.values():
                    for ptr in self.azc.zeroconf.cache.get_all_by_details(service_type, _TYPE_PTR, _CLASS_IN):
                        name = ptr.alias
                        if (not ptr.is_expired(now) and Announcement.node_id_of(name) not in self.view.nodes
                                and name not in self.view.ignored  # another grid's, forged: read once is enough
                                and name not in self._settling and name not in self._pending):
                            self._settled(service_type, name)
            except Exception:  # never let it stop: it is the view's last resort
                log.exception("could not reconcile the grid view with the mDNS cache")

    def _settled(self, service_type: str, name: str) -> None:
        """A goodbye can be a late one: for an earlier registration of a name its node registered
        again (a state it left and came back to within half a second, as a desktop does between two
        short jobs). Its broadcasts then refresh the record while the goodbye expires it, and
        zeroconf reports no new service for a record refreshed within the goodbye's second: the
        node would stay out of the view, idle and never recruited. A record still cached once that
        second is over was said again after the goodbye: read it. One gone was the last word: the
        node left that service (a removal left to us when the service was just registered)."""
        self._settling.pop(name, None)
        ptr = self.azc.zeroconf.cache.async_get_unique(DNSPointer(service_type, _TYPE_PTR, _CLASS_IN, 0, name))
        if ptr is None or ptr.is_expired(current_time_millis()):  # the goodbye was the last word
            rec = self.view.remove(name)  # if its removal was left to us
            if rec is not None and self.on_change:
                self.on_change("removed", rec)
            return
        # The cache may still give the TXT record of the registration the goodbye was for (zeroconf
        # reads the first of a name's records): the newest one we accepted is the one said again.
        rec = self.view.restore(name)
        if rec is not None and self.on_change:
            self.on_change("updated", rec)
        if name not in self._pending:
            self._pending[name] = asyncio.ensure_future(self._resolve(service_type, name))

    def _live_txts(self, name: str) -> list[dict[bytes, bytes | None]]:
        """Every TXT record of `name` the cache holds live. After a late goodbye (see `_settled`), or
        for the second after a node replaces its record, the one replaced is cached beside the
        current one, and zeroconf's ServiceInfo may read either: the view picks by signed time."""
        now = current_time_millis()
        return [txt_properties(r.text) for r in self.azc.zeroconf.cache.get_all_by_details(name, _TYPE_TXT, _CLASS_IN)
                if not r.is_expired(now)]

    async def _resolve(self, service_type: str, name: str) -> None:
        try:
            async with self._slots:
                info = AsyncServiceInfo(service_type, name)
                if not info.load_from_cache(self.azc.zeroconf) and not await info.async_request(
                    self.azc.zeroconf, RESOLVE_TIMEOUT_MS, question_type=DNSQuestionType.QM
                ):
                    self.view.dropped["unresolved"] += 1
                    return
                rec = self.view.offer(
                    service_type,
                    name,
                    self._live_txts(name) or [dict(info.properties)],
                    tuple(info.parsed_addresses(IPVersion.V4Only)),
                    info.port or 0,
                    time.time(),
                )
                if rec is not None and self.on_change:
                    self.on_change("updated", rec)
        except asyncio.CancelledError:
            raise
        except Exception:  # a hostile record must never take the node down
            self.view.dropped["error"] += 1
            log.exception("could not read the announcement %s", name[:80])
        finally:
            if self._pending.get(name) is asyncio.current_task():
                del self._pending[name]
                if name in self._again:
                    self._again.discard(name)
                    self._pending[name] = asyncio.ensure_future(self._resolve(service_type, name))


def txt_properties(text: bytes) -> dict[bytes, bytes | None]:
    """A TXT record's `key=value` strings (length-prefixed, RFC 6763 6.1); the first of a key wins (6.4)."""
    out: dict[bytes, bytes | None] = {}
    i = 0
    while i < len(text):
        item = text[i + 1 : i + 1 + text[i]]
        i += 1 + text[i]
        key, eq, value = item.partition(b"=")
        if key:
            out.setdefault(key, value if eq else None)
    return out


async def browse(
    grid: str,
    key: GridKey,
    addresses: list[str] | None,
    seconds: float,
    every: Callable[[GridView], None] | None = None,
) -> GridView:
    """Browse the grid for `seconds` (forever if inf), calling `every(view)` once a second."""
    azc = open_zeroconf(addresses)
    view = GridView(grid, key)
    browser = Browser(azc, view)
    try:
        await browser.start()
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 1.0) if every else left)
            if every:
                every(view)
    finally:
        await browser.stop()
        await azc.async_close()
    return view
