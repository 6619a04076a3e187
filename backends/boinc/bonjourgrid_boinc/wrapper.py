"""The wrapper app and what a workunit carries: why a plain command looks like a proper BOINC app.

A command that does not use the BOINC API would be restarted by the client
when it exits 0 without a `boinc_finish_called` file, and its files would
never be uploaded when it exits non-zero. The wrapper (a shell script the
worker half installs under the anonymous platform) checks the workunit's
HMAC, runs the task in `pack/out`, records exit code, stdout, stderr and
times in `pack/meta`, tars `pack` into the single result file (gzipped: a
small result stays under the 8 KiB above which the client first asks the server
how much of the file it has, one more HTTP round trip per task), then writes
`boinc_finish_called` and exits 0, so every outcome (failures included)
reaches the coordinator, which matches the job's output globs itself.
"""

from __future__ import annotations

import hashlib
import hmac
import shlex

from .protocol import APP, APP_VERSION, MAC_OPEN_NAME, OUTPUT_OPEN_NAME, PLATFORM, TASK_OPEN_NAME

WRAPPER_NAME = f"{APP}_{APP_VERSION}.sh"

_WRAPPER = r"""#!/bin/sh
# BonjourGrid task wrapper (installed by the worker half; anonymous platform).
KEY=__KEY__
rm -rf pack && mkdir -p pack/meta pack/out
want=$(cat __MAC__ 2>/dev/null)
got=$(openssl dgst -sha256 -mac HMAC -macopt "hexkey:$KEY" < __TASK__ | sed 's/^.*= *//')
date +%s.%N > pack/meta/started_at
if [ -n "$want" ] && [ "$want" = "$got" ]; then
  (cd pack/out && exec sh ../../__TASK__ run) > pack/meta/stdout 2> pack/meta/stderr
  echo $? > pack/meta/exit_code
  (cd pack/out && sh ../../__TASK__ clean) 2>/dev/null
else
  echo "bonjourgrid: the workunit's signature does not match: refused to run it" > pack/meta/stderr
  : > pack/meta/stdout
  echo 126 > pack/meta/exit_code
fi
date +%s.%N > pack/meta/ended_at
tar -cf - -C pack meta out | gzip -1 > __OUT__
echo 0 > boinc_finish_called
exit 0
"""


def wrapper_script(mac_key: bytes) -> str:
    return (_WRAPPER.replace("__KEY__", mac_key.hex()).replace("__MAC__", MAC_OPEN_NAME)
            .replace("__TASK__", TASK_OPEN_NAME).replace("__OUT__", OUTPUT_OPEN_NAME))


def app_info_xml() -> str:
    """Anonymous platform: the client runs our wrapper and takes no app files from the server."""
    return (f"<app_info>\n<app><name>{APP}</name></app>\n"
            f"<file_info><name>{WRAPPER_NAME}</name><executable/></file_info>\n"
            f"<app_version><app_name>{APP}</app_name><version_num>{APP_VERSION}</version_num>"
            f"<platform>{PLATFORM}</platform><avg_ncpus>1</avg_ncpus><max_ncpus>1</max_ncpus>"
            f"<file_ref><file_name>{WRAPPER_NAME}</file_name><main_program/></file_ref></app_version>\n"
            f"</app_info>\n")


def input_open_name(sha256: str) -> str:
    return f"bg_in_{sha256[:24]}"


def task_script(argv: list[str] | tuple[str, ...], env: dict[str, str], inputs: list[dict[str, object]],
                timeout_s: float | None) -> str:
    """`sh bg_task.sh run` stages the inputs and runs the command; `clean` drops unchanged input copies."""
    q = shlex.quote
    stage, clean = [], []
    for f in inputs:
        dest, src = str(f["dest"]), "../../" + input_open_name(str(f["sha256"]))
        if "/" in dest:
            stage.append(f"mkdir -p {q(dest.rsplit('/', 1)[0])}")
        stage.append(f"cp {q(src)} {q(dest)}")
        clean.append(f"cmp -s {q(src)} {q(dest)} && rm -f {q(dest)}")
    envs = " ".join(q(f"{k}={v}") for k, v in sorted(env.items()))
    timeout = f"timeout -s KILL {max(int(timeout_s), 1)} " if timeout_s else ""
    command = f"exec {timeout}env {envs} {' '.join(q(a) for a in argv)}".replace("env  ", "env ")
    return ("case \"$1\" in\nrun)\n" + "".join(s + " || exit 125\n" for s in stage) + command + "\n;;\n"
            "clean)\n" + "".join(c + "\n" for c in clean) + ":\n;;\nesac\n")


def task_mac(mac_key: bytes, script: bytes) -> str:
    return hmac.new(mac_key, script, hashlib.sha256).hexdigest()
