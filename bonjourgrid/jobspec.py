"""Job files: the TOML a user submits, checked once and turned into a `JobSpec` everyone can trust.

The CLI, the coordinator (which receives the job over the network) and the journal (which stores it)
all need one fully validated description of a job. Users need error messages that name the field at
fault, and all of them at once, so that a job file is fixed in one edit rather than one per run.

Entry points: `load_job` (a file), `parse_job` (an already parsed TOML document), `sweep_job` (the
command-line short form) and `JobSpec.from_dict` (the wire/journal form made by `JobSpec.to_dict`).
All four validate; building the dataclasses by hand does not.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import gc
import itertools
import json
import math
import re
import shlex
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .announcement import CAP_RE
from .envelope import MAX_MESSAGE_BYTES
from .units import parse_size

MAX_TASKS = 1_000_000
DEFAULT_CPUS = 1
DEFAULT_MEMORY_BYTES = 512 << 20
DEFAULT_RETRIES = 2
DEFAULT_BACKEND = "native"
RUNTIMES = ("process", "docker")
WIRE_VERSION = 1

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
BACKEND_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PARAM_NAME_RE = ENV_NAME_RE
IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")
# `{{` and `}}` are escapes; `{identifier}` is a placeholder; any other brace is literal text.
_TOKEN_RE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)([smhd])", re.IGNORECASE)
_DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?[smhd])+$", re.IGNORECASE)
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TOML_POS_RE = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
# argv[0] values that run a script: the job is better named after the script.
_INTERPRETER_RE = re.compile(
    r"^(python[\d.]*|pypy[\d.]*|bash|sh|dash|zsh|ksh|Rscript|node|perl|ruby|julia|java|octave|env|time|nice)$"
)

_TOP_FIELDS = (
    "name", "backend", "requires", "retries", "timeout", "inputs", "outputs", "replicas",
    "resources", "runtime", "workers", "env", "backend_options", "task", "sweep",
)  # fmt: skip
# Keys people bring from HTCondor submit files or guess from the JobSpec field names.
_TOP_HINTS = {
    "executable": "task.argv or sweep.argv",
    "arguments": "task.argv or sweep.argv",
    "argv": "task.argv or sweep.argv",
    "queue": "sweep",
    "tasks": "task",
    "request_cpus": "resources.cpus",
    "cpus": "resources.cpus",
    "request_memory": "resources.memory",
    "memory": "resources.memory",
    "request_disk": "resources.disk",
    "disk": "resources.disk",
    "transfer_input_files": "inputs",
    "transfer_output_files": "outputs",
    "environment": "env",
    "image": "runtime.image",
    "docker_image": "runtime.image",
    "network": "runtime.network",
    "max_retries": "retries",
    "requirements": "requires",
}
_WIRE_FIELDS = (
    "version", "name", "tasks", "inputs", "outputs", "cpus", "memory_bytes", "disk_bytes", "requires", "retries",
    "timeout_s", "runtime", "image", "network", "backend", "workers_min", "workers_max", "replicas",
    "backend_options",
)  # fmt: skip
_OPTIONAL_WIRE_FIELDS = ("disk_bytes",)  # added later: a journal written before has no such field


class JobFileError(ValueError):
    """A job description is wrong; `problems` holds every fault found, each starting with its field path."""

    def __init__(self, origin: str, problems: Sequence[str]) -> None:
        self.origin = origin
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(f"{origin}: {p}" for p in self.problems))


@dataclass(frozen=True)
class InputFile:
    """A file staged into every task's sandbox."""

    source: Path  # absolute, on the submitting machine
    dest: str  # relative path inside the sandbox; no '..', never absolute


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One command to run; slots because a sweep may create a million of them."""

    index: int
    argv: tuple[str, ...]
    env: dict[str, str]
    params: dict[str, str]


@dataclass(frozen=True)
class JobSpec:
    """A validated job: what to run, with which files and resources, and on which backend."""

    name: str
    tasks: tuple[TaskSpec, ...]
    inputs: tuple[InputFile, ...] = ()
    outputs: tuple[str, ...] = ()
    cpus: int = DEFAULT_CPUS
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    disk_bytes: int | None = None  # the most a task may keep in its directory (None: up to the node's reserve)
    requires: tuple[str, ...] = ()
    retries: int = DEFAULT_RETRIES
    timeout_s: float | None = None
    runtime: str = "process"
    image: str | None = None
    network: bool = False
    backend: str = DEFAULT_BACKEND
    workers_min: int = 1
    workers_max: int | None = None
    replicas: int | None = None
    backend_options: dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form for the network and the journal; `from_dict` reads it back unchanged.

        A field added later is left out when it has its default, so that nodes of an older version,
        which refuse fields they do not know, still read such jobs (as replicas, say)."""
        return {
            "version": WIRE_VERSION,
            "name": self.name,
            "tasks": [_task_wire(t) for t in self.tasks],
            "inputs": [{"source": str(f.source), "dest": f.dest} for f in self.inputs],
            "outputs": list(self.outputs),
            "cpus": self.cpus,
            "memory_bytes": self.memory_bytes,
            **({} if self.disk_bytes is None else {"disk_bytes": self.disk_bytes}),
            "requires": list(self.requires),
            "retries": self.retries,
            "timeout_s": self.timeout_s,
            "runtime": self.runtime,
            "image": self.image,
            "network": self.network,
            "backend": self.backend,
            "workers_min": self.workers_min,
            "workers_max": self.workers_max,
            "replicas": self.replicas,
            "backend_options": copy.deepcopy(self.backend_options),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], origin: str = "<job dict>") -> JobSpec:
        """Rebuild and re-check a job received from elsewhere: the sender is not trusted to have validated it.

        Input files are not required to exist here: their sources live on the submitting machine.
        """
        return _from_wire(d, origin)


# --------------------------------------------------------------------------------------------- helpers


class _Problems:
    """Collects faults instead of stopping at the first, so the user sees them all."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}" if path else message)

    def raise_if_any(self) -> None:
        if self.items:
            raise JobFileError(self.origin, self.items)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _show(value: object) -> str:
    """How a wrong value is quoted in a message, in TOML terms."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str | int | float):
        return repr(value)
    return f"{type(value).__name__} {value}"


def _check_keys(
    table: Mapping[str, Any], known: Iterable[str], path: str, p: _Problems, hints: Mapping[str, str] | None = None
) -> None:
    known = tuple(known)
    for key in table:
        if key in known:
            continue
        where = path or ""
        if hints and key in hints:
            p.add(where, f"unknown field '{key}' (did you mean '{hints[key]}'?)")
            continue
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        if close:
            p.add(where, f"unknown field '{key}' (did you mean '{close[0]}'?)")
        else:
            p.add(where, f"unknown field '{key}' (known fields: {', '.join(known)})")


def _table(value: object, path: str, p: _Problems) -> Mapping[str, Any] | None:
    if isinstance(value, Mapping):
        return value
    p.add(path, f"expected a table, got {_show(value)}")
    return None


def _int(value: object, path: str, p: _Problems, minimum: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
    p.add(path, f"expected {what}, got {_show(value)}")
    return None


def _bool(value: object, path: str, p: _Problems) -> bool | None:
    if isinstance(value, bool):
        return value
    p.add(path, f"expected true or false, got {_show(value)}")
    return None


def _scalar(value: object, path: str, p: _Problems) -> str | None:
    """TOML scalars as the strings a command line or environment gets; floats keep their shortest form."""
    if isinstance(value, str):
        if "\0" in value:
            p.add(path, "must not contain a NUL character")
            return None
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    p.add(path, f"expected a string or a number, got {_show(value)}")
    return None


def _strict_str(value: object, path: str, p: _Problems) -> str | None:
    if isinstance(value, str) and "\0" not in value:
        return value
    p.add(path, f"expected a string, got {_show(value)}")
    return None


def _name(value: object, path: str, p: _Problems) -> str | None:
    if isinstance(value, str) and NAME_RE.match(value):
        return value
    p.add(path, f"not a valid job name: {_show(value)} (1 to 48 of A-Z a-z 0-9 _ . -, starting with a letter or digit)")
    return None


def _backend(value: object, path: str, p: _Problems) -> str | None:
    if isinstance(value, str) and BACKEND_RE.match(value):
        return value
    p.add(path, f"not a valid backend name: {_show(value)} (e.g. 'native', 'htcondor', 'boinc')")
    return None


def _tags(value: object, path: str, p: _Problems) -> tuple[str, ...]:
    """Capability tags as nodes announce them: KEY or KEY=VALUE, same charset as announcements."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        p.add(path, f"expected a list of capability tags, got {_show(value)}")
        return ()
    out: list[str] = []
    for i, tag in enumerate(value):
        if isinstance(tag, str) and CAP_RE.match(tag):
            out.append(tag)
        else:
            p.add(
                _join(path, i),
                f"not a capability tag: {_show(tag)} (KEY or KEY=VALUE; KEY of A-Z a-z 0-9 _ . + -, "
                "VALUE may also hold ':' and '/')",
            )
    return tuple(dict.fromkeys(out))


def _memory(value: object, path: str, p: _Problems) -> int | None:
    if isinstance(value, bool) or not isinstance(value, str | int):
        p.add(path, f"expected a size such as '512M' or a number of bytes, got {_show(value)}")
        return None
    try:
        n = parse_size(value)
    except ValueError as e:
        p.add(path, str(e))
        return None
    if n <= 0:
        p.add(path, "must be more than 0")
        return None
    return n


def parse_duration(value: object) -> float:
    """Seconds from 90, 1.5, '90', '90s', '10m', '2h', '1d' or '1h30m'; raises ValueError saying what is accepted."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a duration such as 90, '90s', '10m' or '2h', got {_show(value)}")
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            seconds = float(text)
        elif _DURATION_RE.match(text):
            seconds = float(sum(float(n) * _SECONDS[u.lower()] for n, u in _DURATION_PART_RE.findall(text)))
        else:
            raise ValueError(f"not a duration: {value!r} (use e.g. 90, '90s', '10m', '2h' or '1h30m')")
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be more than 0 seconds, got {_show(value)} (leave it out for no limit)")
    return seconds


def _timeout(value: object, path: str, p: _Problems) -> float | None:
    try:
        return parse_duration(value)
    except ValueError as e:
        p.add(path, str(e))
        return None


def _rel_path(value: object, path: str, p: _Problems) -> str | None:
    """A path inside the task sandbox: relative, '/'-separated, never climbing out of it."""
    if not isinstance(value, str) or not value.strip():
        p.add(path, f"expected a relative path, got {_show(value)}")
        return None
    if "\0" in value or "\\" in value:
        p.add(path, f"{value!r}: use '/' as separator and no NUL or backslash characters")
        return None
    if value.startswith(("/", "~")) or PureWindowsPath(value).drive:
        p.add(path, f"{value!r} is absolute: paths in the task sandbox must be relative")
        return None
    pure = PurePosixPath(value)
    if ".." in pure.parts:
        p.add(path, f"{value!r} contains '..': paths must stay inside the task sandbox")
        return None
    if not pure.parts:
        p.add(path, f"{value!r} does not name a file")
        return None
    return str(pure)


def _json_value(value: object, path: str, p: _Problems) -> bool:
    """backend_options travel as JSON: refuse what JSON cannot carry (TOML dates, NaN)."""
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        if math.isfinite(value):
            return True
        p.add(path, "infinite or NaN numbers cannot be sent to a backend")
        return False
    if isinstance(value, list | tuple):
        return all([_json_value(v, _join(path, i), p) for i, v in enumerate(value)])
    if isinstance(value, Mapping):
        ok = True
        for k, v in value.items():
            if not isinstance(k, str):
                p.add(path, f"table keys must be strings, got {_show(k)}")
                ok = False
            elif not _json_value(v, _join(path, k), p):
                ok = False
        return ok
    p.add(path, f"{_show(value)} cannot be sent to a backend (dates and times: write them as strings)")
    return False


def _disk_backend(disk: int | None, backend: str | None, path: str, p: _Problems) -> None:
    """A disk limit nobody would enforce is refused, not ignored."""
    if disk is not None and backend not in (None, "native"):
        p.add(path, f"only the native backend limits a task's disk; the {backend} backend keeps its "
                    "middleware's own default")


def _backend_options(value: object, path: str, p: _Problems) -> dict[str, object]:
    table = _table(value, path, p)
    if table is None or not _json_value(table, path, p):
        return {}
    return copy.deepcopy(dict(table))


def _env(value: object, path: str, p: _Problems, *, strict: bool = False) -> dict[str, str]:
    table = _table(value, path, p)
    out: dict[str, str] = {}
    for k, v in (table or {}).items():
        if not ENV_NAME_RE.match(k):
            p.add(
                _join(path, k),
                "not a valid environment variable name (letters, digits and _, not starting with a digit)",
            )
            continue
        s = _strict_str(v, _join(path, k), p) if strict else _scalar(v, _join(path, k), p)
        if s is not None:
            out[k] = s
    return out


# --------------------------------------------------------------------------------------------- templates


class _Template:
    """A string with `{name}` placeholders, split once so a million tasks render quickly."""

    __slots__ = ("fmt", "keys", "static")

    def __init__(self, text: str) -> None:
        fmt: list[str] = []  # the same text as a str.format pattern: rendering then runs at C speed
        static: list[str] = []  # the text without its placeholders, escapes resolved
        self.keys: list[str] = []
        pos = 0
        for m in _TOKEN_RE.finditer(text):
            literal = text[pos : m.start()]
            fmt.append(literal.replace("{", "{{").replace("}", "}}"))
            static.append(literal)
            tok = m.group(0)
            if tok in ("{{", "}}"):
                fmt.append(tok)
                static.append(tok[0])
            else:
                fmt.append("{" + m.group(1) + "}")
                self.keys.append(m.group(1))
            pos = m.end()
        fmt.append(text[pos:].replace("{", "{{").replace("}", "}}"))
        static.append(text[pos:])
        self.fmt = "".join(fmt)
        self.static = "".join(static)

    def check(self, allowed: Sequence[str], path: str, p: _Problems) -> bool:
        ok = True
        for key in dict.fromkeys(self.keys):
            if key in allowed:
                continue
            ok = False
            known = ", ".join("{" + a + "}" for a in allowed)
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{{{close[0]}}}'? " if close else ""
            p.add(path, f"unknown placeholder '{{{key}}}' ({hint}known here: {known}; write '{{{{' for a literal '{{')")
        return ok

    def render(self, values: Mapping[str, str]) -> str:
        return self.fmt.format_map(values) if self.keys else self.static


def _argv_templates(value: object, path: str, p: _Problems) -> list[_Template] | None:
    """argv as a list (preferred) or a string split like a shell would, without running one."""
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as e:
            p.add(path, f"cannot split the command line: {e}")
            return None
    if not isinstance(value, list | tuple) or not value:
        p.add(path, f"expected a non-empty list of arguments, got {_show(value)}")
        return None
    out: list[_Template] = []
    for i, arg in enumerate(value):
        s = _scalar(arg, _join(path, i), p)
        if s is not None:
            out.append(_Template(s))
    if len(out) != len(value):
        return None
    if not out[0].fmt:
        p.add(_join(path, 0), "the program to run must not be empty")
        return None
    return out


class _Group:
    """One `[[task]]` or one `[sweep]`: templates plus the parameter rows that fill them."""

    def __init__(self, argv: list[_Template], env: dict[str, _Template], names: list[str], rows: Iterable[tuple]):
        self.argv = argv
        self.env = env
        self.names = names
        self.rows = rows


def _parse_env_templates(value: object, path: str, p: _Problems) -> dict[str, _Template]:
    return {k: _Template(v) for k, v in _env(value, path, p).items()}


def _check_group_templates(
    argv: list[_Template], env: dict[str, _Template], allowed: list[str], path: str, p: _Problems
) -> bool:
    ok = True
    for i, t in enumerate(argv):
        ok = t.check(allowed, _join(_join(path, "argv"), i), p) and ok
    for k, t in env.items():
        ok = t.check(allowed, _join(_join(path, "env"), k), p) and ok
    return ok


def _explicit_task(value: object, path: str, p: _Problems) -> tuple[_Group | None, int]:
    table = _table(value, path, p)
    if table is None:
        return None, 0
    _check_keys(table, ("argv", "env"), path, p)
    if "argv" not in table:
        p.add(path, 'missing \'argv\' (the command to run, e.g. argv = ["python3", "sim.py"])')
        return None, 1
    argv = _argv_templates(table["argv"], _join(path, "argv"), p)
    env = _parse_env_templates(table.get("env", {}), _join(path, "env"), p)
    if argv is None or not _check_group_templates(argv, env, ["i"], path, p):
        return None, 1
    return _Group(argv, env, [], [()]), 1


def _sweep(value: object, path: str, p: _Problems) -> tuple[_Group | None, int]:
    table = _table(value, path, p)
    if table is None:
        return None, 0
    _check_keys(table, ("argv", "env", "params", "count"), path, p)
    ok = True
    argv = None
    if "argv" not in table:
        p.add(path, "missing 'argv' (the command to run, with placeholders such as {i})")
        ok = False
    else:
        argv = _argv_templates(table["argv"], _join(path, "argv"), p)
    env = _parse_env_templates(table.get("env", {}), _join(path, "env"), p)
    names: list[str] = []
    values: list[list[str]] = []
    params: Mapping[str, Any] | None = None
    count = 0
    if ("params" in table) == ("count" in table):
        p.add(path, "give either 'params' (a table of value lists) or 'count' (a number of tasks), not both or neither")
        ok = False
    elif "count" in table:
        n = _int(table["count"], _join(path, "count"), p, 1)
        if n is None:
            ok = False
        else:
            count = n
    else:
        params = _table(table["params"], _join(path, "params"), p)
        if params is None:
            ok = False
        elif not params:
            p.add(_join(path, "params"), "needs at least one parameter, e.g. params = { seed = [1, 2, 3] }")
            ok = False
        for pname, pvalues in (params or {}).items():
            ppath = _join(_join(path, "params"), pname)
            if not PARAM_NAME_RE.match(pname) or pname == "i":
                p.add(
                    ppath,
                    "not a valid parameter name (letters, digits and _, not starting with a digit; 'i' is "
                    "reserved for the task index)",
                )
                ok = False
                continue
            if not isinstance(pvalues, list):
                pvalues = [pvalues]
            if not pvalues:
                p.add(ppath, "needs at least one value")
                ok = False
                continue
            strs = [_scalar(v, _join(ppath, j), p) for j, v in enumerate(pvalues)]
            if any(s is None for s in strs):
                ok = False
                continue
            names.append(pname)
            values.append([s for s in strs if s is not None])
        count = math.prod(len(v) for v in values) if ok else 0
    # Placeholders are checked against every declared parameter, even a faulty one, to avoid knock-on errors.
    declared = ["i", *(k for k in (params or {}) if k != "i")]
    templates_ok = _check_group_templates(argv or [], env, declared, path, p)
    if argv is None or not ok or not templates_ok:
        return None, count
    rows: Iterable[tuple] = itertools.product(*values) if names else itertools.repeat((), count)
    return _Group(argv, env, names, rows), count


def _as_list(value: object) -> list[object]:
    """`[[task]]` is a list; a single `[task]` table is accepted as a list of one."""
    return list(value) if isinstance(value, list) else [value]


def _expand(groups: list[_Group], job_env: Mapping[str, str]) -> tuple[TaskSpec, ...]:
    """Explicit tasks first, then each sweep; within a sweep the first parameter is the outer loop."""
    tasks: list[TaskSpec] = []
    shared_env = dict(job_env)
    for g in groups:
        const_argv = None if any(t.keys for t in g.argv) else tuple(t.static for t in g.argv)
        names = g.names
        for row in g.rows:
            index = len(tasks)
            params = dict(zip(names, row, strict=True))
            values = {**params, "i": str(index)}
            argv = const_argv or tuple([t.render(values) for t in g.argv])
            if g.env:
                env = dict(job_env)
                env.update({k: t.render(values) for k, t in g.env.items()})
            else:
                env = shared_env  # no per-task env: one dict shared by all tasks, to save memory
            tasks.append(TaskSpec(index, argv, env, params))
    return tuple(tasks)


# --------------------------------------------------------------------------------------------- cross-field


def _runtime_checks(
    runtime: str | None,
    image: str | None,
    network: bool | None,
    image_given: bool,
    network_given: bool,
    paths: tuple[str, str, str],
    p: _Problems,
) -> None:
    kind_path, image_path, net_path = paths
    if runtime is None:
        return
    if runtime not in RUNTIMES:
        p.add(kind_path, f"unknown runtime {_show(runtime)} (use 'process' or 'docker')")
        return
    if runtime == "docker":
        if not image_given:
            p.add(image_path, "required with runtime 'docker' (e.g. image = \"python:3.11-slim\")")
    else:
        if image_given:
            p.add(image_path, "only allowed with runtime 'docker'")
        if network_given and network:
            p.add(net_path, "only allowed with runtime 'docker' (processes use the worker's network)")


def _image(value: object, path: str, p: _Problems) -> str | None:
    if isinstance(value, str) and IMAGE_RE.match(value):
        return value
    p.add(path, f"not a docker image reference: {_show(value)} (e.g. 'busybox:latest', 'python:3.11-slim')")
    return None


def _check_dests(inputs: Sequence[tuple[str, str]], p: _Problems) -> None:
    """Two inputs may not land on the same path, nor one inside another (a file cannot be a directory)."""
    seen: dict[str, str] = {}
    for path, dest in inputs:
        if dest in seen:
            p.add(path, f"destination {dest!r} is already used by {seen[dest]}")
            continue
        seen[dest] = path
    dests = sorted(seen)
    for a, b in itertools.pairwise(dests):
        if b.startswith(a + "/"):
            p.add(seen[b], f"destination {b!r} would be inside the file {a!r} of {seen[a]}")


def _check_outputs(value: object, path: str, p: _Problems) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        p.add(path, f"expected a list of file names or globs, got {_show(value)}")
        return ()
    out = [_rel_path(v, _join(path, i), p) for i, v in enumerate(value)]
    return tuple(dict.fromkeys(o for o in out if o is not None))


def _workers(wmin: int | None, wmax: int | None, max_path: str, p: _Problems) -> None:
    if wmin is not None and wmax is not None and wmax < wmin:
        p.add(max_path, f"must be at least the minimum number of workers ({wmin}), got {wmax}")


def _with_docker_cap(requires: tuple[str, ...], runtime: str | None) -> tuple[str, ...]:
    """A docker job can only run where docker is: make that a requirement the matcher sees."""
    if runtime == "docker" and "docker" not in requires:
        return (*requires, "docker")
    return requires


# --------------------------------------------------------------------------------------------- job files


def _inputs(value: object, base_dir: Path, p: _Problems) -> tuple[InputFile, ...]:
    if isinstance(value, str | Mapping):
        value = [value]
    if not isinstance(value, list):
        p.add("inputs", f"expected a list of files, got {_show(value)}")
        return ()
    found: list[InputFile] = []
    dests: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        path = _join("inputs", i)
        dest_path = path
        if isinstance(item, Mapping):
            _check_keys(item, ("src", "dest"), path, p)
            if "src" not in item:
                p.add(path, "missing 'src' (the file on this machine)")
                continue
            src = _strict_str(item["src"], _join(path, "src"), p)
            dest_value = item.get("dest")
            dest_path = _join(path, "dest")
        else:
            src = _strict_str(item, path, p)
            dest_value = None
        if src is None or not src:
            if src == "":
                p.add(path, "empty file name")
            continue
        source = Path(src).expanduser()
        if not source.is_absolute():
            source = base_dir / source
        source = source.resolve()
        if dest_value is None:
            dest_value = source.name
        dest = _rel_path(dest_value, dest_path, p)
        if not source.exists():
            p.add(path, f"no such file: {str(source)!r} (relative paths start from {str(base_dir)!r})")
            continue
        if not source.is_file():
            p.add(path, f"{str(source)!r} is not a regular file (list the files of a directory one by one)")
            continue
        if dest is not None:
            found.append(InputFile(source, dest))
            dests.append((dest_path, dest))
    _check_dests(dests, p)
    return tuple(found)


def parse_job(doc: Mapping[str, Any], base_dir: Path, origin: str = "<job>") -> JobSpec:
    """Validate a parsed job document; relative input paths start from `base_dir`."""
    p = _Problems(origin)
    if not isinstance(doc, Mapping):
        p.add("", f"a job must be a table, got {_show(doc)}")
        p.raise_if_any()
    base_dir = Path(base_dir).expanduser().resolve()
    _check_keys(doc, _TOP_FIELDS, "", p, _TOP_HINTS)

    backend = _backend(doc.get("backend", DEFAULT_BACKEND), "backend", p)
    requires = _tags(doc.get("requires", []), "requires", p)
    retries = _int(doc.get("retries", DEFAULT_RETRIES), "retries", p, 0)
    timeout = _timeout(doc["timeout"], "timeout", p) if "timeout" in doc else None
    replicas = _int(doc["replicas"], "replicas", p, 1) if "replicas" in doc else None
    inputs = _inputs(doc.get("inputs", []), base_dir, p)
    outputs = _check_outputs(doc.get("outputs", []), "outputs", p)
    env = _env(doc.get("env", {}), "env", p)
    backend_options = _backend_options(doc.get("backend_options", {}), "backend_options", p)

    cpus, memory, disk = DEFAULT_CPUS, DEFAULT_MEMORY_BYTES, None
    resources = _table(doc.get("resources", {}), "resources", p)
    if resources is not None:
        _check_keys(resources, ("cpus", "memory", "disk"), "resources", p,
                    {"memory_bytes": "memory", "cpu": "cpus", "disk_bytes": "disk"})
        cpus = _int(resources.get("cpus", DEFAULT_CPUS), "resources.cpus", p, 1) or DEFAULT_CPUS
        if "memory" in resources:
            memory = _memory(resources["memory"], "resources.memory", p) or DEFAULT_MEMORY_BYTES
        if "disk" in resources:
            disk = _memory(resources["disk"], "resources.disk", p)
            _disk_backend(disk, backend, "resources.disk", p)

    runtime_value = doc.get("runtime", {})
    if isinstance(runtime_value, str):
        runtime_value = {"kind": runtime_value}
    runtime: str | None = "process"
    image: str | None = None
    network: bool | None = False
    rt = _table(runtime_value, "runtime", p)
    if rt is not None:
        _check_keys(rt, ("kind", "image", "network"), "runtime", p)
        runtime = _strict_str(rt.get("kind", "process"), "runtime.kind", p)
        if "image" in rt and runtime == "docker":
            image = _image(rt["image"], "runtime.image", p)
        if "network" in rt:
            network = _bool(rt["network"], "runtime.network", p)
        _runtime_checks(
            runtime,
            image,
            network,
            "image" in rt,
            "network" in rt,
            ("runtime.kind", "runtime.image", "runtime.network"),
            p,
        )

    workers_min, workers_max = 1, None
    wk = _table(doc.get("workers", {}), "workers", p)
    if wk is not None:
        _check_keys(wk, ("min", "max"), "workers", p)
        workers_min = _int(wk.get("min", 1), "workers.min", p, 1) or 1
        workers_max = _int(wk["max"], "workers.max", p, 1) if "max" in wk else None
        _workers(workers_min, workers_max, "workers.max", p)

    groups: list[_Group] = []
    total = 0
    explicit = doc.get("task", [])
    task_items = _as_list(explicit)
    for i, item in enumerate(task_items):
        g, n = _explicit_task(item, _join("task", i) if isinstance(explicit, list) else "task", p)
        total += n
        if g:
            groups.append(g)
    sweeps = doc.get("sweep", [])
    sweep_items = _as_list(sweeps)
    for i, item in enumerate(sweep_items):
        g, n = _sweep(item, _join("sweep", i) if isinstance(sweeps, list) else "sweep", p)
        total += n
        if g:
            groups.append(g)
    if not task_items and not sweep_items:
        p.add("", "no tasks: add [[task]] tables with an argv, or a [sweep]")
    elif total > MAX_TASKS:
        p.add("", f"{total} tasks is more than the limit of {MAX_TASKS}")

    if "name" in doc:
        name = _name(doc["name"], "name", p)
    else:
        first = groups[0].argv if groups else []
        name = _derive_name([t.static for t in first])

    p.raise_if_any()
    with _no_gc():
        tasks = _expand(groups, env)
    assert name is not None and backend is not None and retries is not None and runtime is not None
    return _fits_a_message(JobSpec(
        name=name,
        tasks=tasks,
        inputs=inputs,
        outputs=outputs,
        cpus=cpus,
        memory_bytes=memory,
        disk_bytes=disk,
        requires=_with_docker_cap(requires, runtime),
        retries=retries,
        timeout_s=timeout,
        runtime=runtime,
        image=image,
        network=bool(network),
        backend=backend,
        workers_min=workers_min,
        workers_max=workers_max,
        replicas=replicas,
        backend_options=backend_options,
    ), origin)


# A job travels whole, in one message, to its coordinator (the submit request) and to its replicas
# (the journal's first change): what does not fit must be a clear error here, not a connection
# the node resets. The margin is for the envelope and the changes a replica batch adds.
MAX_JOB_BYTES = MAX_MESSAGE_BYTES - (512 << 10)


def _fits_a_message(spec: JobSpec, origin: str) -> JobSpec:
    """The job's wire size, counted task by task: a sweep far too big is refused without encoding it all."""
    size = base = len(json.dumps(replace(spec, tasks=()).to_dict()))
    for n, t in enumerate(spec.tasks, 1):
        size += len(json.dumps(_task_wire(t))) + 2
        if size > MAX_JOB_BYTES:
            per_task = (size - base) / n
            total = size + per_task * (len(spec.tasks) - n)
            raise JobFileError(origin, [
                f"{len(spec.tasks)} tasks make {total / 2**20:.2f} MiB to send to the coordinator, more than "
                f"the {MAX_JOB_BYTES / 2**20:.2f} MiB one job can hold (about {int(MAX_JOB_BYTES / per_task)} "
                f"tasks like these): split the sweep into several jobs"])
    return spec


def _task_wire(t: TaskSpec) -> dict[str, Any]:
    return {"index": t.index, "argv": list(t.argv), "env": dict(t.env), "params": dict(t.params)}


def load_job(path: Path | str) -> JobSpec:
    """Read and validate a job file; every fault, including a missing file or bad TOML, is a JobFileError."""
    path = Path(path)
    origin = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise JobFileError(origin, ["no such file"]) from None
    except IsADirectoryError:
        raise JobFileError(origin, ["is a directory, not a job file"]) from None
    except OSError as e:
        raise JobFileError(origin, [f"cannot read: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobFileError(origin, [f"not UTF-8 text (bad byte at offset {e.start})"]) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        m = _TOML_POS_RE.search(message)
        if m:
            message = f"line {m.group(1)}, column {m.group(2)}: TOML syntax error: {message[: m.start()]}"
        else:
            message = f"TOML syntax error: {message}"
        raise JobFileError(origin, [message]) from None
    return parse_job(doc, path.parent, origin)


def _derive_name(argv: Sequence[str]) -> str:
    """A job without a name is named after its script ('python3 sim.py' -> 'sim'), else its program."""
    words = [a for a in argv if a]
    candidate = words[0] if words else ""
    if words and _INTERPRETER_RE.match(PurePosixPath(words[0]).name):
        for w in words[1:]:
            if not w.startswith("-") and "=" not in w:
                candidate = w
                break
    stem = PurePosixPath(candidate.replace("\\", "/")).stem if candidate else ""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).lstrip("_.-")[:48].rstrip("-")
    return clean if clean and NAME_RE.match(clean) else "job"


# The short form's keyword arguments, mapped to where they live in a job file.
_OVERRIDES: dict[str, tuple[str, ...]] = {
    "cpus": ("resources", "cpus"),
    "memory": ("resources", "memory"),
    "memory_bytes": ("resources", "memory"),
    "disk": ("resources", "disk"),
    "disk_bytes": ("resources", "disk"),
    "retries": ("retries",),
    "timeout": ("timeout",),
    "timeout_s": ("timeout",),
    "requires": ("requires",),
    "inputs": ("inputs",),
    "outputs": ("outputs",),
    "env": ("env",),
    "replicas": ("replicas",),
    "runtime": ("runtime", "kind"),
    "image": ("runtime", "image"),
    "network": ("runtime", "network"),
    "workers_min": ("workers", "min"),
    "workers_max": ("workers", "max"),
    "backend_options": ("backend_options",),
}


def sweep_job(
    argv: Sequence[str],
    count: int,
    *,
    name: str | None = None,
    backend: str = DEFAULT_BACKEND,
    base_dir: Path | None = None,
    origin: str = "<command line>",
    **overrides: Any,
) -> JobSpec:
    """The short form `submit --tasks N -- CMD {i}`: built as the equivalent job file, so both give equal specs.

    `overrides` take JobSpec field names (cpus, memory, retries, timeout, requires, inputs, ...); None means
    "not given". Relative inputs start from `base_dir` (default: the current directory).
    """
    doc: dict[str, Any] = {"backend": backend, "sweep": {"argv": list(argv), "count": count}}
    if name is not None:
        doc["name"] = name
    for key, value in overrides.items():
        if key not in _OVERRIDES:
            close = difflib.get_close_matches(key, _OVERRIDES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(f"sweep_job() got an unexpected keyword argument {key!r}{hint}")
        if value is None:
            continue
        where = _OVERRIDES[key]
        if where == ("inputs",) or where == ("outputs",) or where == ("requires",):
            value = list(value) if isinstance(value, tuple) else value
        if len(where) == 1:
            doc[where[0]] = value
        else:
            doc.setdefault(where[0], {})[where[1]] = value
    return parse_job(doc, base_dir if base_dir is not None else Path.cwd(), origin)


# --------------------------------------------------------------------------------------------- wire form


def _from_wire(d: Mapping[str, Any], origin: str) -> JobSpec:
    p = _Problems(origin)
    if not isinstance(d, Mapping):
        p.add("", f"expected a job object, got {_show(d)}")
        p.raise_if_any()
    _check_keys(d, _WIRE_FIELDS, "", p)
    missing = [k for k in _WIRE_FIELDS if k not in d and k not in _OPTIONAL_WIRE_FIELDS]
    if missing:
        p.add("", f"missing fields: {', '.join(missing)}")
        p.raise_if_any()
    if d["version"] != WIRE_VERSION:
        p.add("version", f"unsupported job format version {_show(d['version'])} (this node reads {WIRE_VERSION})")
        p.raise_if_any()

    name = _name(d["name"], "name", p)
    backend = _backend(d["backend"], "backend", p)
    cpus = _int(d["cpus"], "cpus", p, 1)
    memory = _int(d["memory_bytes"], "memory_bytes", p, 1)
    disk = None if d.get("disk_bytes") is None else _int(d["disk_bytes"], "disk_bytes", p, 1)
    _disk_backend(disk, backend, "disk_bytes", p)
    retries = _int(d["retries"], "retries", p, 0)
    timeout = None
    if isinstance(d["timeout_s"], str):
        p.add("timeout_s", "expected a number of seconds or null")
    elif d["timeout_s"] is not None:
        timeout = _timeout(d["timeout_s"], "timeout_s", p)
    replicas = None if d["replicas"] is None else _int(d["replicas"], "replicas", p, 1)
    workers_min = _int(d["workers_min"], "workers_min", p, 1)
    workers_max = None if d["workers_max"] is None else _int(d["workers_max"], "workers_max", p, 1)
    _workers(workers_min, workers_max, "workers_max", p)
    runtime = _strict_str(d["runtime"], "runtime", p)
    network = _bool(d["network"], "network", p)
    image = None if d["image"] is None else _image(d["image"], "image", p)
    _runtime_checks(runtime, image, network, d["image"] is not None, True, ("runtime", "image", "network"), p)
    requires = d["requires"]
    if not isinstance(requires, list | tuple):
        p.add("requires", f"expected a list, got {_show(requires)}")
        requires = []
    tags = _tags(requires, "requires", p)
    if len({str(r) for r in requires}) != len(requires):
        p.add("requires", "duplicate capability tags")
    outputs_raw = d["outputs"]
    outputs = _check_outputs(outputs_raw, "outputs", p) if isinstance(outputs_raw, list | tuple) else ()
    if not isinstance(outputs_raw, list | tuple):
        p.add("outputs", f"expected a list, got {_show(outputs_raw)}")
    elif len(outputs) != len(outputs_raw) or list(outputs) != list(outputs_raw):
        p.add("outputs", "paths must be unique and normalised")
    backend_options = _backend_options(d["backend_options"], "backend_options", p)

    inputs: list[InputFile] = []
    dests: list[tuple[str, str]] = []
    if not isinstance(d["inputs"], list | tuple):
        p.add("inputs", f"expected a list, got {_show(d['inputs'])}")
    else:
        for i, item in enumerate(d["inputs"]):
            path = _join("inputs", i)
            if _table(item, path, p) is None:
                continue
            _check_keys(item, ("source", "dest"), path, p)
            src = _strict_str(item.get("source"), _join(path, "source"), p)
            dest = _rel_path(item.get("dest"), _join(path, "dest"), p)
            if src is not None and not PurePosixPath(src).is_absolute() and not PureWindowsPath(src).drive:
                p.add(_join(path, "source"), f"must be an absolute path, got {src!r}")
                continue
            if dest is not None and dest != item.get("dest"):
                p.add(_join(path, "dest"), f"not normalised: {item.get('dest')!r}")
                continue
            if src is not None and dest is not None:
                inputs.append(InputFile(Path(src), dest))
                dests.append((_join(path, "dest"), dest))
    _check_dests(dests, p)

    tasks: list[TaskSpec] = []
    raw_tasks = d["tasks"]
    if not isinstance(raw_tasks, list | tuple) or not raw_tasks:
        p.add("tasks", "expected a non-empty list of tasks")
    elif len(raw_tasks) > MAX_TASKS:
        p.add("tasks", f"{len(raw_tasks)} tasks is more than the limit of {MAX_TASKS}")
    else:
        with _no_gc():
            tasks = _wire_tasks(raw_tasks, p)
    if runtime == "docker" and "docker" not in tags:
        p.add("requires", "a docker job must require the 'docker' capability")

    p.raise_if_any()
    assert name and backend and cpus and memory and retries is not None and runtime and workers_min
    return JobSpec(
        name=name,
        tasks=tuple(tasks),
        inputs=tuple(inputs),
        outputs=outputs,
        cpus=cpus,
        memory_bytes=memory,
        disk_bytes=disk,
        requires=tags,
        retries=retries,
        timeout_s=timeout,
        runtime=runtime,
        image=image,
        network=bool(network),
        backend=backend,
        workers_min=workers_min,
        workers_max=workers_max,
        replicas=replicas,
        backend_options=backend_options,
    )


_TASK_KEYS = {"index", "argv", "env", "params"}


def _wire_tasks(raw_tasks: Sequence[Any], p: _Problems) -> list[TaskSpec]:
    """Check received tasks; a fast path for well-formed ones, since a job may carry a million."""
    tasks: list[TaskSpec] = []
    last_env: dict[str, str] | None = None
    for i, t in enumerate(raw_tasks):
        if (
            type(t) is dict
            and t.keys() == _TASK_KEYS
            and type(t["index"]) is int
            and t["index"] == i
            and type(t["argv"]) is list
            and t["argv"]
            and t["argv"][0]
            and all(type(a) is str and "\0" not in a for a in t["argv"])
            and type(t["params"]) is dict
            and all(
                type(v) is str and type(k) is str and PARAM_NAME_RE.match(k) and k != "i"
                for k, v in t["params"].items()
            )
        ):
            env = t["env"]
            if env != last_env or type(env) is not dict:
                before = len(p.items)
                last_env = _env(env, _join(_join("tasks", i), "env"), p, strict=True)
                if len(p.items) != before:
                    last_env = None
                    continue
            # equal environments share one dict: a sweep's tasks usually all have the same one
            tasks.append(TaskSpec(i, tuple(t["argv"]), last_env, dict(t["params"])))
            continue
        _wire_task_problems(i, t, p)
        if len(p.items) > 50:  # a broken million-task job should not produce a million messages
            p.add("tasks", "too many problems, stopped checking")
            break
    return tasks


def _wire_task_problems(i: int, t: object, p: _Problems) -> None:
    """The slow path: say exactly what is wrong with a task the fast path refused."""
    path = _join("tasks", i)
    if _table(t, path, p) is None:
        return
    assert isinstance(t, Mapping)
    before = len(p.items)
    _check_keys(t, sorted(_TASK_KEYS), path, p)
    for key in sorted(_TASK_KEYS - t.keys()):
        p.add(path, f"missing field '{key}'")
    if t.get("index") != i or isinstance(t.get("index"), bool):
        p.add(_join(path, "index"), f"expected {i}, got {_show(t.get('index'))}")
    argv = t.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
        p.add(_join(path, "argv"), "expected a non-empty list of strings")
    elif not argv[0]:
        p.add(_join(_join(path, "argv"), 0), "the program to run must not be empty")
    _env(t.get("env"), _join(path, "env"), p, strict=True)
    params = _table(t.get("params"), _join(path, "params"), p) or {}
    for k, v in params.items():
        if not isinstance(k, str) or not PARAM_NAME_RE.match(k) or k == "i":
            p.add(_join(_join(path, "params"), str(k)), "not a valid parameter name")
        _strict_str(v, _join(_join(path, "params"), str(k)), p)
    if len(p.items) == before:
        p.add(path, "malformed task")


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Building a million small objects triggers the cycle collector over and over; they hold no cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
