"""BOINC failover pieces: the loopback relay, adoption of a predecessor's replicas, outputs handed over.

The relay tests use real sockets on 127.0.0.1 only (two small HTTP servers stand in for coordinators).
"""

from __future__ import annotations

import asyncio
import hashlib
import xml.etree.ElementTree as ET

import pytest
from bonjourgrid_boinc import guirpc, handover, identity, protocol, relay
from bonjourgrid_boinc.quorum import DONE, LOST, SENT, Outcome, TaskReplicas
from bonjourgrid_boinc.upload import UploadStore

# ------------------------------------------------------------------ relay, pure --


def test_request_head_is_parsed_and_rewritten_for_the_coordinator():
    raw = (b"POST /ce/cgi HTTP/1.1\r\nHost: 127.0.0.1:2000\r\nContent-Length: 12\r\nExpect: 100-continue\r\n"
           b"Connection: keep-alive\r\nAccept: */*")
    head = relay.parse_head(raw)
    assert (head.method, head.target, head.content_length, head.expects_continue) == ("POST", "/ce/cgi", 12, True)
    out = relay.upstream_head(head).decode()
    assert out.startswith("POST /ce/cgi HTTP/1.1\r\n") and out.endswith("\r\n\r\n")
    assert "Host: 127.0.0.1:2000" in out  # the coordinator builds its URLs on the client's own
    assert "Expect" not in out and "keep-alive" not in out and out.count("Connection: close") == 1


@pytest.mark.parametrize("raw", [
    b"GET http://elsewhere/ HTTP/1.1\r\nHost: x",  # proxy form: the relay goes to the coordinator only
    b"DELETE /ce/ HTTP/1.1\r\nHost: x",
    b"POST /ce/cgi HTTP/1.1\r\nTransfer-Encoding: chunked",
    b"POST /ce/cgi HTTP/1.1\r\nContent-Length: -1",
    b"POST /ce/cgi HTTP/1.1\r\nContent-Length: 99999999999999",
    b"POST /ce/cgi HTTP/1.1\r\n Bad: folded",
    b"\x00\x01garbage",
])
def test_bad_requests_are_refused(raw):
    with pytest.raises(ValueError):
        relay.parse_head(raw).content_length  # noqa: B018


def test_response_head_closes_the_connection():
    out = relay.response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive").decode()
    assert out == "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
    with pytest.raises(ValueError):
        relay.response_head(b"SSH-2.0-OpenSSH")


@pytest.mark.parametrize("url", ["https://h:1/ce/", "http://h/ce/", "ftp://h:1/", "not a url", ""])
def test_upstream_must_be_an_http_project_url(url):
    with pytest.raises(ValueError):
        relay.parse_upstream(url)


# ------------------------------------------------------------------ relay, I/O ---


class Coordinator:
    """A stand-in coordinator on loopback: answers, or swallows requests without an answer (it 'died')."""

    def __init__(self, name: str, answer: bool = True) -> None:
        self.name, self.answer = name, answer
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/ce/"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        n = relay.parse_head(head[:-4]).content_length
        body = await reader.readexactly(n)
        self.requests.append(head + body)
        if self.answer:
            reply = f"{self.name}:{body.decode()}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))
            await writer.drain()
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def post(port: int, body: bytes, expect: bool = False) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    extra = b"Expect: 100-continue\r\n" if expect else b""
    w.write(b"POST /ce/cgi HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%sContent-Length: %d\r\n\r\n" % (port, extra, len(body)))
    if expect:
        assert await r.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    w.write(body)
    await w.drain()
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    return data


def test_relay_passes_requests_and_answers_through():
    async def scenario() -> None:
        a = Coordinator("A")
        rl = relay.Relay(0, await a.start())
        port = await rl.start()
        reply = await post(port, b"hello", expect=True)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"A:hello")
        assert b"Connection: close" in reply
        assert b"Host: 127.0.0.1:%d" % port in a.requests[0]
        await rl.stop()
        await a.stop()

    asyncio.run(scenario())


def test_a_request_the_dead_coordinator_refused_waits_for_the_successor():
    async def scenario() -> None:
        a, b = Coordinator("A"), Coordinator("B")
        url_a = await a.start()
        await a.stop()  # dead: connections refused
        rl = relay.Relay(0, url_a)
        port = await rl.start()
        pending = asyncio.ensure_future(post(port, b"report"))
        await asyncio.sleep(0.3)
        assert not pending.done()  # held, not failed: the client does not back off
        rl.set_upstream(await b.start())
        assert (await pending).endswith(b"B:report")
        await rl.stop()
        await b.stop()

    asyncio.run(scenario())


def test_a_request_left_unanswered_goes_again_to_the_successor_only():
    async def scenario() -> None:
        a, b = Coordinator("A", answer=False), Coordinator("B")
        rl = relay.Relay(0, await a.start())
        port = await rl.start()
        pending = asyncio.ensure_future(post(port, b"report"))
        await asyncio.sleep(0.3)
        assert len(a.requests) == 1 and not pending.done()  # delivered, unanswered: not sent to A again
        rl.set_upstream(await b.start())
        assert (await pending).endswith(b"B:report")
        assert rl.replayed == 1 and len(a.requests) == 1 and len(b.requests) == 1
        await rl.stop()
        await a.stop()
        await b.stop()

    asyncio.run(scenario())


def test_nobody_comes_the_client_gets_a_502():
    async def scenario() -> None:
        a = Coordinator("A")
        url = await a.start()
        await a.stop()
        rl = relay.Relay(0, url, hold_s=0.5)
        port = await rl.start()
        assert (await post(port, b"x")).startswith(b"HTTP/1.1 502")
        await rl.stop()

    asyncio.run(scenario())


def test_a_garbage_request_gets_a_400_and_the_relay_goes_on():
    async def scenario() -> None:
        a = Coordinator("A")
        rl = relay.Relay(0, await a.start())
        port = await rl.start()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"\x16\x03\x01 not http\r\n\r\n")
        assert (await r.read()).startswith(b"HTTP/1.1 400")
        w.close()
        assert (await post(port, b"ok")).endswith(b"A:ok")
        await rl.stop()
        await a.stop()

    asyncio.run(scenario())


# ------------------------------------------------------------- adoption, pure ---


def test_names_carry_the_epoch_and_give_back_their_task():
    assert protocol.result_name(7, 2, 1) == "t7_2_1" and protocol.task_of("t7_2_1") == 7
    t = TaskReplicas(7, epoch=3)
    assert t.issue("n1").name == "t7_3_1"
    for bad in ("t7_1", "x7_1_1", "t7_1_1_out", "t-1_1_1", "t99999999999_1_1", "t7_1_1\n"):
        assert protocol.task_of(bad) is None


def test_a_successor_adopts_what_a_client_holds_and_loses_what_it_dropped():
    t = TaskReplicas(4, epoch=2)
    ours = t.issue("n1")
    adopted = t.adopt("t4_1_1", "n2")
    assert adopted is not None and adopted.state == SENT and t.wanted() == 0  # not sent a third time
    assert t.adopt("t4_1_1", "n2") is None  # known already
    assert t.dropped_by("n1", {"t4_1_1"}) == [ours] and ours.state == LOST
    assert t.dropped_by("n2", {"t4_1_1"}) == []
    t.report("t4_1_1", Outcome(0, ()))
    assert t.replicas["t4_1_1"].state == DONE and t.canonical() is not None
    t.settled = True
    assert t.adopt("t4_1_5", "n3") is None  # a settled task adopts nothing


def test_reply_keeps_outputs_on_the_client_until_acknowledged():
    item = protocol.WorkItem("t3", "t3_1_2", [], 99, 1000)
    root = ET.fromstring(protocol.build_reply(project_name="p", master_url="http://h:1/ce/", upload_url="u",
                                              hostid=None, work=[item], acks=["t2_1_1"]))
    out = next(f for f in root.findall("file_info") if f.findtext("name") == "t3_1_2_out")
    assert out.find("sticky") is not None
    assert root.findtext("delete_file_info") == "t2_1_1_out"


def test_master_url_follows_the_host_the_client_used():
    assert identity.url_for_host("127.0.0.1:25000", "ce1", "http://10.0.0.1:9/ce1/") == "http://127.0.0.1:25000/ce1/"
    for bad in (None, "", "h/../x", "a b", "h:1\r\nX: y", "x" * 300):
        assert identity.url_for_host(bad, "ce1", "http://10.0.0.1:9/ce1/") == "http://10.0.0.1:9/ce1/"


# ------------------------------------------------------------------- handover ---

RESULTS = b"""<boinc_gui_rpc_reply>
<results>
<result><name>t1_1_1</name><project_url>http://127.0.0.1:2000/ce/</project_url><state>5</state><ready_to_report/>
</result>
<result><name>t2_1_1</name><project_url>http://127.0.0.1:2000/ce/</project_url><state>2</state></result>
<result><name>t3_1_1</name><project_url>http://127.0.0.1:2000/ce/</project_url><state>5</state><got_server_ack/>
</result>
<result><name>t4_1_1</name><project_url>http://other:1/</project_url><state>5</state></result>
</results>
</boinc_gui_rpc_reply>
\x03"""


def test_held_results_are_read_from_the_gui_rpc_reply():
    held = guirpc.held_results(RESULTS, "http://127.0.0.1:2000/ce/")
    assert held == [guirpc.Held("t1_1_1", 5), guirpc.Held("t2_1_1", 2)]  # acknowledged and other projects left out
    with pytest.raises(guirpc.GuiRpcError):
        guirpc.held_results(b"<results><result>", "x")


def test_only_uploaded_outputs_still_on_disk_are_handed_over(tmp_path):
    (tmp_path / "t1_1_1_out").write_bytes(b"tar")
    (tmp_path / "t2_1_1_out").write_bytes(b"partial")
    (tmp_path / "evil_out").write_bytes(b"x")
    held = [("t1_1_1", 5), ("t2_1_1", 4), ("t5_1_1", 5), ("evil", 5)]
    assert handover.to_hand_over(held, tmp_path) == [tmp_path / "t1_1_1_out"]


def test_a_handed_over_output_is_what_the_upload_handler_takes(tmp_path):
    data = b"x" * 10000
    body = protocol.upload_head("t1_1_1_out", len(data), hashlib.md5(data).hexdigest()) + data
    store = UploadStore(tmp_path, lambda name: 1 << 20 if name == "t1_1_1_out" else None)
    assert b"<status>0</status>" in store.handle(body)
    assert (tmp_path / "t1_1_1_out").read_bytes() == data
