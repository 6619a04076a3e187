"""BOINC protocol pieces without a network: scheduler request/reply, uploads, GUI-RPC framing, wrapper files."""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

from bonjourgrid_boinc import guirpc, identity, protocol, wrapper
from bonjourgrid_boinc.results import unpack
from bonjourgrid_boinc.upload import UploadStore

from bonjourgrid.gridkey import GridKey

REQUEST = b"""<scheduler_request><authenticator>abc</authenticator><hostid>0</hostid>
<platform_name>x86_64-pc-linux-gnu</platform_name><work_req_seconds>103680</work_req_seconds>
<cpu_req_instances>2</cpu_req_instances><host_info><p_ncpus>2</p_ncpus></host_info>
<result><name>t3_1</name><final_elapsed_time>1.5</final_elapsed_time><exit_status>0</exit_status><state>5</state>
<stderr_out><![CDATA[<stderr_txt>x</stderr_txt>]]></stderr_out></result>
<other_results><other_result><name>t4_1</name></other_result></other_results></scheduler_request>"""


def test_request_is_parsed():
    req = protocol.parse_request(REQUEST)
    assert req.authenticator == "abc" and req.hostid == 0 and req.wants_work and req.ncpus == 2
    assert [(r.name, r.state) for r in req.reported] == [("t3_1", protocol.FILES_UPLOADED)]
    assert req.in_progress == ["t4_1"]


def test_reply_acks_and_describes_work():
    item = protocol.WorkItem("t3", "t3_2", [protocol.InputRef("f", "http://h/d/f", 3, "0" * 32, "data.txt")], 99, 1000)
    xml = protocol.build_reply(project_name="p", master_url="http://h:1/ce/", upload_url="http://h:1/ce/up",
                               hostid=7, work=[item], acks=["t3_1"], next_rpc_delay=60)
    root = ET.fromstring(xml)
    assert root.findtext("hostid") == "7" and root.findtext("result_ack/name") == "t3_1"
    assert root.find("app_version") is None  # anonymous platform: the client refuses server app versions
    assert root.find("result/report_immediately") is not None
    assert root.findtext("workunit/file_ref/open_name") == "data.txt"
    assert root.find("workunit/file_ref/copy_file") is not None


def test_master_page_has_the_scheduler_link_in_the_order_the_client_scans():
    assert '<link rel="boinc_scheduler" href="http://h/cgi">' in protocol.master_page("p", "http://h/cgi")


def test_uploads_only_known_files_resume_and_check_md5(tmp_path):
    store = UploadStore(tmp_path, lambda name: 100 if name == "t1_1_out" else None)
    data = b"hello world"
    md5 = hashlib.md5(data).hexdigest()

    def body(name, offset, chunk):
        return (f"<data_server_request><file_upload><file_info><name>{name}</name></file_info><nbytes>{len(data)}"
                f"</nbytes><md5_cksum>{md5}</md5_cksum><offset>{offset}</offset><data>\n").encode() + chunk

    assert b"<status>-1</status>" in store.handle(body("evil", 0, data))
    assert b"<status>0</status>" in store.handle(body("t1_1_out", 0, data[:5]))
    size = store.handle(b"<data_server_request><get_file_size>t1_1_out</get_file_size></data_server_request>")
    assert b"<file_size>5</file_size>" in size
    assert b"<status>0</status>" in store.handle(body("t1_1_out", 5, data[5:]))
    assert (tmp_path / "t1_1_out").read_bytes() == data
    assert b"<status>-1</status>" in store.handle(body("t1_1_out", 0, b"x" * 200))


def test_gui_rpc_framing_and_auth():
    assert guirpc.frame("<auth1/>").endswith(b"</boinc_gui_rpc_request>\n\x03")
    nonce = guirpc.nonce_of(b"<boinc_gui_rpc_reply><nonce>1234.5</nonce></boinc_gui_rpc_reply>\x03")
    assert hashlib.md5(b"1234.5pw").hexdigest() in guirpc.auth2(nonce, "pw")


def test_identity_is_derived_so_a_successor_serves_the_same_project():
    key = GridKey.generate()
    assert identity.authenticator(key, "ce1") == identity.authenticator(key, "ce1") != identity.authenticator(key, "c2")
    assert identity.project_port(key, "ce1") == identity.project_port(key, "ce1")
    assert identity.project_dir_name("http://10.0.0.1:8765/job-1/") == "10.0.0.1_8765_job-1"


def test_wrapper_runs_a_signed_task_and_refuses_a_forged_one(tmp_path):
    key = b"k" * 32
    (tmp_path / "w.sh").write_text(wrapper.wrapper_script(key))
    sha = hashlib.sha256(b"in\n").hexdigest()
    (tmp_path / wrapper.input_open_name(sha)).write_text("in\n")
    script = wrapper.task_script(["sh", "-c", "cat data.txt > o.txt; echo $X"], {"X": "42"},
                                 [{"dest": "data.txt", "sha256": sha}], None).encode()
    (tmp_path / protocol.TASK_OPEN_NAME).write_bytes(script)
    (tmp_path / protocol.MAC_OPEN_NAME).write_text(wrapper.task_mac(key, script))
    subprocess.run(["sh", "w.sh"], cwd=tmp_path, check=True)
    assert (tmp_path / "boinc_finish_called").exists()
    o = unpack(tmp_path / protocol.OUTPUT_OPEN_NAME, tmp_path / "x", ("*.txt",))
    assert o.exit_code == 0 and o.stdout == b"42\n" and [p for p, _, _ in o.outputs] == ["o.txt"]  # input dropped
    assert (tmp_path / protocol.OUTPUT_OPEN_NAME).stat().st_size < 8192  # one HTTP request to upload it
    (tmp_path / protocol.MAC_OPEN_NAME).write_text("0" * 64)
    subprocess.run(["sh", "w.sh"], cwd=tmp_path, check=True)
    o = unpack(tmp_path / protocol.OUTPUT_OPEN_NAME, tmp_path / "y", ("*.txt",))
    assert o.exit_code == 126 and b"signature" in o.stderr


def test_unpack_ignores_links_and_paths_outside(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("out/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    o = unpack(evil, tmp_path / "u", ("*",))
    assert o.exit_code == -1 and o.outputs == ()
    assert not Path(tmp_path / "u" / "out" / "link").exists()
