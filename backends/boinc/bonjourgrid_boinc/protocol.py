"""BOINC's scheduler and data-server protocol as the 7.20 client speaks it: parsing and building only (sans-I/O).

See docs/backends/boinc.md. Element order in replies does not matter to the
client; what it needs is named in the notes (`<hostid>` only for a new host,
`<result_ack>` for every reported result, `<master_url>` equal to the attached
URL, no `<app_version>` for an anonymous-platform project).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

APP = "bgtask"
APP_VERSION = 1
PLATFORM = "x86_64-pc-linux-gnu"
UPLOAD_PATH = "file_upload_handler"
SCHEDULER_PATH = "cgi"
OUTPUT_OPEN_NAME = "bg_result.tar"
TASK_OPEN_NAME = "bg_task.sh"
MAC_OPEN_NAME = "bg_task.mac"
# BOINC result states (lib/common_defs.h)
FILES_UPLOADED = 5


@dataclass
class Reported:
    """A finished result the client reports."""

    name: str
    state: int
    exit_status: int
    elapsed: float
    stderr: str = ""


@dataclass
class SchedulerRequest:
    authenticator: str
    hostid: int
    platform: str
    work_req_seconds: float
    req_instances: float
    ncpus: int
    reported: list[Reported] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)

    @property
    def wants_work(self) -> bool:
        return self.work_req_seconds > 0 or self.req_instances > 0


def _text(el: ET.Element | None, tag: str, default: str = "") -> str:
    if el is None:
        return default
    found = el.find(tag)
    return (found.text or "").strip() if found is not None and found.text is not None else default


def _num(el: ET.Element | None, tag: str) -> float:
    try:
        return float(_text(el, tag, "0") or 0)
    except ValueError:
        return 0.0


def parse_request(body: bytes) -> SchedulerRequest:
    """The client's POSTed XML. Raises ValueError when it is not a scheduler request."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise ValueError(f"not XML: {e}") from e
    if root.tag != "scheduler_request":
        raise ValueError(f"unexpected root <{root.tag}>")
    host = root.find("host_info")
    reported = [
        Reported(name=_text(r, "name"), state=int(_num(r, "state")), exit_status=int(_num(r, "exit_status")),
                 elapsed=_num(r, "final_elapsed_time"), stderr=_text(r, "stderr_out"))
        for r in root.findall("result")
    ]
    others = [_text(r, "name") for r in root.findall("other_results/other_result")]
    return SchedulerRequest(
        authenticator=_text(root, "authenticator"),
        hostid=int(_num(root, "hostid")),
        platform=_text(root, "platform_name"),
        work_req_seconds=_num(root, "work_req_seconds"),
        req_instances=_num(root, "cpu_req_instances"),
        ncpus=int(_num(host, "p_ncpus")) or 1,
        reported=reported,
        in_progress=others,
    )


@dataclass
class InputRef:
    """A file a workunit needs, named by content so each client downloads it once."""

    name: str
    url: str
    nbytes: int
    md5: str
    open_name: str


@dataclass
class WorkItem:
    """One BOINC result (a replica of a task) to send."""

    wu_name: str
    result_name: str
    inputs: list[InputRef]
    report_deadline: int
    max_output_bytes: int
    fpops_est: float = 1e9
    fpops_bound: float = 1e15
    memory_bound: float = 5e8
    disk_bound: float = 1e10


def master_page(project_name: str, scheduler_url: str) -> str:
    # The client finds the scheduler with sscanf: this exact attribute order.
    return (f"<html><head><title>{escape(project_name)}</title>\n"
            f'<link rel="boinc_scheduler" href="{escape(scheduler_url)}">\n'
            f"</head><body><scheduler>{escape(scheduler_url)}</scheduler>\n"
            f"BonjourGrid computing element {escape(project_name)}</body></html>\n")


def output_file_name(result_name: str) -> str:
    return f"{result_name}_out"


_RESULT = re.compile(r"t(\d{1,9})_(\d{1,9})_(\d{1,9})")


def result_name(index: int, epoch: int, seq: int) -> str:
    """A replica's name. The epoch keeps a successor's names apart from those its predecessor handed out."""
    return f"t{index}_{epoch}_{seq}"


def task_of(name: str) -> int | None:
    """The task a replica name belongs to, or None if it is not one of ours."""
    m = _RESULT.fullmatch(name)
    return int(m.group(1)) if m else None


def build_reply(*, project_name: str, master_url: str, upload_url: str, hostid: int | None,
                work: list[WorkItem], acks: list[str], aborts: list[str] = (),  # type: ignore[assignment]
                next_rpc_delay: float | None = None, request_delay: float | None = None,
                message: str | None = None) -> bytes:
    """A scheduler reply; `hostid` only for a host that sent 0."""
    out = ["<scheduler_reply>", f"<project_name>{escape(project_name)}</project_name>",
           f"<master_url>{escape(master_url)}</master_url>", "<scheduler_version>720</scheduler_version>"]
    if hostid is not None:
        out.append(f"<hostid>{hostid}</hostid>")
    if next_rpc_delay is not None:
        out.append(f"<next_rpc_delay>{next_rpc_delay:g}</next_rpc_delay>")
    if request_delay is not None:
        out.append(f"<request_delay>{request_delay:g}</request_delay>")
    if message:
        out.append(f'<message priority="notice">{escape(message)}</message>')
    if work:
        out.append(f"<app><name>{APP}</name><user_friendly_name>BonjourGrid task</user_friendly_name></app>")
    seen: set[str] = set()
    for w in work:
        for f in w.inputs:
            if f.name not in seen:
                seen.add(f.name)
                out.append(f"<file_info><name>{escape(f.name)}</name><url>{escape(f.url)}</url>"
                           f"<nbytes>{f.nbytes}</nbytes><md5_cksum>{f.md5}</md5_cksum></file_info>")
        refs = "".join(f"<file_ref><file_name>{escape(f.name)}</file_name><open_name>{escape(f.open_name)}"
                       f"</open_name><copy_file/></file_ref>" for f in w.inputs)
        out.append(f"<workunit><name>{escape(w.wu_name)}</name><app_name>{APP}</app_name>"
                   f"<version_num>{APP_VERSION}</version_num><rsc_fpops_est>{w.fpops_est:g}</rsc_fpops_est>"
                   f"<rsc_fpops_bound>{w.fpops_bound:g}</rsc_fpops_bound>"
                   f"<rsc_memory_bound>{w.memory_bound:g}</rsc_memory_bound>"
                   f"<rsc_disk_bound>{w.disk_bound:g}</rsc_disk_bound>{refs}</workunit>")
        out_name = output_file_name(w.result_name)
        # Sticky: the client keeps the output after uploading it, until we acknowledge the report
        # (`<delete_file_info>` below), so a successor can be handed what a dead coordinator received.
        out.append(f"<file_info><name>{escape(out_name)}</name><upload_url>{escape(upload_url)}</upload_url>"
                   f"<max_nbytes>{w.max_output_bytes}</max_nbytes><xml_signature>unsigned</xml_signature>"
                   f"<sticky/></file_info>")
        out.append(f"<result><name>{escape(w.result_name)}</name><wu_name>{escape(w.wu_name)}</wu_name>"
                   f"<report_deadline>{w.report_deadline}</report_deadline><platform>{PLATFORM}</platform>"
                   f"<version_num>{APP_VERSION}</version_num><report_immediately/>"
                   f"<file_ref><file_name>{escape(out_name)}</file_name><open_name>{OUTPUT_OPEN_NAME}</open_name>"
                   f"<copy_file/></file_ref></result>")
    for name in acks:
        out.append(f"<result_ack><name>{escape(name)}</name></result_ack>")
        out.append(f"<delete_file_info>{escape(output_file_name(name))}</delete_file_info>")
    for name in aborts:
        out.append(f"<result_abort><name>{escape(name)}</name></result_abort>")
    out.append("</scheduler_reply>\n")
    return "\n".join(out).encode()


# ------------------------------------------------------------------ uploads --

_SIMPLE = re.compile(rb"<(name|nbytes|md5_cksum|offset|get_file_size)>([^<]*)</\1>")


@dataclass
class UploadRequest:
    name: str
    offset: int
    nbytes: int
    md5: str
    data: bytes
    size_query: bool = False


def parse_upload(body: bytes) -> UploadRequest:
    """`<data_server_request>…<data>\\n` then raw bytes; or a `<get_file_size>` query (resume)."""
    head, sep, data = body.partition(b"<data>\n")
    fields = {m.group(1).decode(): m.group(2).decode().strip() for m in _SIMPLE.finditer(head)}
    if "get_file_size" in fields:
        return UploadRequest(fields["get_file_size"], 0, 0, "", b"", size_query=True)
    if not sep or "name" not in fields:
        raise ValueError("not a file upload")
    return UploadRequest(fields["name"], int(float(fields.get("offset", "0") or 0)),
                         int(float(fields.get("nbytes", "0") or 0)), fields.get("md5_cksum", ""), data)


def upload_head(name: str, nbytes: int, md5: str) -> bytes:
    """What precedes a whole file's bytes in an upload, as the client sends it (offset 0)."""
    return (f"<data_server_request>\n<core_client_major_version>7</core_client_major_version>\n<file_upload>\n"
            f"<file_info>\n<name>{escape(name)}</name>\n</file_info>\n<nbytes>{nbytes}</nbytes>\n"
            f"<md5_cksum>{md5}</md5_cksum>\n<offset>0</offset>\n<data>\n").encode()


def upload_reply(status: int, message: str = "", file_size: int | None = None) -> bytes:
    """0 ok, 1 transient, -1 permanent."""
    parts = [f"<data_server_reply><status>{status}</status>"]
    if file_size is not None:
        parts.append(f"<file_size>{file_size}</file_size>")
    if message:
        parts.append(f"<message>{escape(message)}</message>")
    parts.append("</data_server_reply>\n")
    return "".join(parts).encode()
