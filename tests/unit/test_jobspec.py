"""Job files: what users write, what the grid receives, and the messages users see when it is wrong."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bonjourgrid.jobspec import (
    DEFAULT_MEMORY_BYTES,
    InputFile,
    JobFileError,
    JobSpec,
    TaskSpec,
    load_job,
    parse_duration,
    parse_job,
    sweep_job,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(JobFileError) as info:
        load_job(write(tmp_path, text))
    return info.value.problems


def one_problem(tmp_path: Path, text: str) -> str:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    return problems[0]


# ------------------------------------------------------------------------------------------ examples


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*/*.toml")), ids=lambda p: p.name)
def test_every_example_loads_and_round_trips(path: Path) -> None:
    job = load_job(path)
    assert job.tasks
    for f in job.inputs:
        assert f.source.is_absolute() and f.source.is_file()
    assert JobSpec.from_dict(json.loads(json.dumps(job.to_dict()))) == job


def test_pi_example_is_a_three_by_three_sweep() -> None:
    job = load_job(EXAMPLES / "pi" / "pi.toml")
    assert job.name == "pi"
    assert len(job.tasks) == 9
    assert job.inputs == (InputFile(EXAMPLES / "pi" / "pi.py", "pi.py"),)
    assert job.memory_bytes == 128 << 20
    assert job.timeout_s == 600.0
    assert job.tasks[0].argv == ("python3", "pi.py", "--seed", "1", "--n", "10000")
    assert job.tasks[0].env == {"PYTHONHASHSEED": "0"}


def test_wordcount_example_renames_its_input() -> None:
    job = load_job(EXAMPLES / "wordcount" / "wordcount.toml")
    assert [f.dest for f in job.inputs] == ["wc.py", "input.txt"]
    assert job.inputs[1].source == EXAMPLES / "wordcount" / "data" / "words.txt"
    assert [t.argv[2] for t in job.tasks] == ["0", "1", "2"]
    assert job.timeout_s == 60.0


def test_docker_example_requires_docker() -> None:
    job = load_job(EXAMPLES / "docker-hello" / "hello.toml")
    assert (job.runtime, job.image, job.network) == ("docker", "busybox:latest", False)
    assert "docker" in job.requires
    assert job.workers_max == 2


# ------------------------------------------------------------------------------------------ defaults and fields


def test_minimal_job_gets_the_documented_defaults(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, '[[task]]\nargv = ["python3", "-u", "sim.py"]\n'))
    assert job == JobSpec(
        name="sim",  # named after the script
        tasks=(TaskSpec(0, ("python3", "-u", "sim.py"), {}, {}),),
    )
    assert (job.cpus, job.memory_bytes, job.retries, job.timeout_s) == (1, DEFAULT_MEMORY_BYTES, 2, None)
    assert (job.runtime, job.image, job.network, job.backend) == ("process", None, False, "native")
    assert (job.workers_min, job.workers_max, job.replicas, job.backend_options) == (1, None, None, {})


def test_every_field(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.csv").write_text("x\n")
    (tmp_path / "pi.py").write_text("")
    job = load_job(
        write(
            tmp_path,
            """
name = "full.job-1"
backend = "boinc"
requires = ["python3.11", "site=lab1", "arch=x86_64:v3/avx"]
retries = 0
timeout = "1h30m"
inputs = ["pi.py", { src = "data/big.csv", dest = "in/data.csv" }]
outputs = ["result-*.txt", "./logs/out.log"]
replicas = 3
[resources]
cpus = 4
memory = "1.5G"
[workers]
min = 2
max = 8
[env]
OMP_NUM_THREADS = 1
[backend_options]
quorum = 2
deadline = { days = 3 }
[[task]]
argv = "python3 pi.py 'two words' {i}"
env = { OMP_NUM_THREADS = "2", EXTRA = "yes" }
""",
        )
    )
    assert job.name == "full.job-1"
    assert job.backend == "boinc"
    assert job.requires == ("python3.11", "site=lab1", "arch=x86_64:v3/avx")
    assert job.retries == 0
    assert job.timeout_s == 5400.0
    assert job.inputs == (
        InputFile(tmp_path.resolve() / "pi.py", "pi.py"),
        InputFile(tmp_path.resolve() / "data" / "big.csv", "in/data.csv"),
    )
    assert job.outputs == ("result-*.txt", "logs/out.log")
    assert job.replicas == 3
    assert (job.cpus, job.memory_bytes, job.disk_bytes) == (4, 1536 << 20, None)
    assert (job.workers_min, job.workers_max) == (2, 8)
    assert job.backend_options == {"quorum": 2, "deadline": {"days": 3}}
    (task,) = job.tasks
    assert task.argv == ("python3", "pi.py", "two words", "0")  # a string argv is split like a shell would
    assert task.env == {"OMP_NUM_THREADS": "2", "EXTRA": "yes"}  # the task's env wins over the job's


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(90, 90.0), (1.5, 1.5), ("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("2h", 7200.0), ("1d", 86400.0),
     ("1h30m", 5400.0), ("0.5m", 30.0)],
)  # fmt: skip
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["", "ten minutes", "10x", "-5", 0, -1, True, [1]])
def test_bad_durations(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_network_needs_docker_but_false_is_harmless(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, '[runtime]\nnetwork = false\n[[task]]\nargv = ["true"]\n'))
    assert job.network is False
    problem = one_problem(tmp_path, '[runtime]\nnetwork = true\n[[task]]\nargv = ["true"]\n')
    assert problem.startswith("runtime.network: only allowed with runtime 'docker'")


def test_runtime_shorthand_string(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, 'runtime = "docker"\n[[task]]\nargv = ["true"]\n')
    assert problem.startswith("runtime.image: required with runtime 'docker'")


# ------------------------------------------------------------------------------------------ tasks and sweeps


def test_sweep_is_a_cartesian_product_first_parameter_outermost(tmp_path: Path) -> None:
    job = load_job(
        write(
            tmp_path,
            """
[sweep]
argv = ["sim", "--seed", "{seed}", "--n", "{n}", "--task", "{i}"]
env = { SEED = "{seed}" }
params = { seed = [1, 2], n = [100, 1000, 0.5] }
""",
        )
    )
    got = [(t.index, t.params["seed"], t.params["n"]) for t in job.tasks]
    assert got == [
        (0, "1", "100"),
        (1, "1", "1000"),
        (2, "1", "0.5"),
        (3, "2", "100"),
        (4, "2", "1000"),
        (5, "2", "0.5"),
    ]
    assert job.tasks[4].argv == ("sim", "--seed", "2", "--n", "1000", "--task", "4")
    assert job.tasks[4].env == {"SEED": "2"}
    assert job.tasks[4].params == {"seed": "2", "n": "1000"}


def test_explicit_tasks_come_first_and_i_counts_across_the_job(tmp_path: Path) -> None:
    job = load_job(
        write(
            tmp_path,
            """
[[task]]
argv = ["prepare", "{i}"]
[[task]]
argv = ["prepare", "{i}"]
[sweep]
argv = ["work", "{i}", "{x}"]
params = { x = ["a", "b"] }
""",
        )
    )
    assert [t.argv for t in job.tasks] == [
        ("prepare", "0"),
        ("prepare", "1"),
        ("work", "2", "a"),
        ("work", "3", "b"),
    ]
    assert [t.index for t in job.tasks] == [0, 1, 2, 3]
    assert job.tasks[0].params == {}


def test_several_sweeps_as_an_array_of_tables(tmp_path: Path) -> None:
    job = load_job(
        write(
            tmp_path,
            '[[sweep]]\nargv = ["a", "{i}"]\ncount = 2\n[[sweep]]\nargv = ["b", "{k}"]\nparams = { k = "only" }\n',
        )
    )
    assert [t.argv for t in job.tasks] == [("a", "0"), ("a", "1"), ("b", "only")]


def test_count_sweep_uses_the_task_index(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, '[sweep]\nargv = ["sim.py", "--seed", "{i}"]\ncount = 3\n'))
    assert [t.argv[-1] for t in job.tasks] == ["0", "1", "2"]
    assert all(t.params == {} for t in job.tasks)


def test_brace_escapes_and_literal_braces(tmp_path: Path) -> None:
    job = load_job(
        write(
            tmp_path,
            r"""
[sweep]
argv = ["awk", "{print $1}", "{{i}}", "{{{i}}}", "}}", "x{{"]
count = 2
""",
        )
    )
    # `{{` and `}}` are escapes; braces around anything but a name are left alone (handy for awk, shell, JSON)
    assert job.tasks[1].argv == ("awk", "{print $1}", "{i}", "{1}", "}", "x{")


def test_unknown_placeholder_is_named_with_a_suggestion(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, '[sweep]\nargv = ["sim", "{sede}"]\nparams = { seed = [1] }\n')
    assert problem.startswith("sweep.argv[1]: unknown placeholder '{sede}' (did you mean '{seed}'?")
    problem = one_problem(tmp_path, '[[task]]\nargv = ["sim", "{seed}"]\n')
    assert problem.startswith("task[0].argv[1]: unknown placeholder '{seed}'")
    problem = one_problem(tmp_path, '[sweep]\nargv = ["sim"]\nenv = { X = "{y}" }\ncount = 1\n')
    assert problem.startswith("sweep.env.X: unknown placeholder '{y}'")


# ------------------------------------------------------------------------------------------ errors


def test_unknown_fields_suggest_the_right_one(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        """
retry = 3
cpus = 2
[resources]
memroy = "1G"
[workers]
mx = 3
[[task]]
argv = ["true"]
envv = {}
""",
    )
    assert problems == [
        "unknown field 'retry' (did you mean 'retries'?)",
        "unknown field 'cpus' (did you mean 'resources.cpus'?)",
        "resources: unknown field 'memroy' (did you mean 'memory'?)",
        "workers: unknown field 'mx' (did you mean 'max'?)",
        "task[0]: unknown field 'envv' (did you mean 'env'?)",
    ]


def test_all_problems_are_reported_at_once_with_the_file_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
name = "no spaces allowed"
retries = "two"
timeout = "soon"
requires = ["site = lab1"]
replicas = 0
outputs = ["/tmp/out"]
[resources]
cpus = 0
memory = "12X"
[workers]
min = 4
max = 2
[env]
"1BAD" = "x"
[[task]]
argv = []
""",
    )
    with pytest.raises(JobFileError) as info:
        load_job(path)
    problems = info.value.problems
    expected_starts = [
        "requires[0]: not a capability tag: 'site = lab1'",
        "retries: expected a non-negative integer, got 'two'",
        "timeout: not a duration: 'soon'",
        "replicas: expected a positive integer, got 0",
        "outputs[0]: '/tmp/out' is absolute",
        "env.1BAD: not a valid environment variable name",
        "resources.cpus: expected a positive integer, got 0",
        "resources.memory: not a size: '12X' (use e.g. 512M, 4G",
        "workers.max: must be at least the minimum number of workers (4), got 2",
        "task[0].argv: expected a non-empty list of arguments",
        "name: not a valid job name: 'no spaces allowed'",
    ]
    assert len(problems) == len(expected_starts), problems
    for problem, start in zip(problems, expected_starts, strict=True):
        assert problem.startswith(start), (problem, start)
    message = str(info.value)
    assert message.count(str(path)) == len(problems)  # every line names the file
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("snippet", "start"),
    [
        ("retries = -1", "retries: expected a non-negative integer, got -1"),
        ("retries = true", "retries: expected a non-negative integer, got true"),
        ("retries = 2.0", "retries: expected a non-negative integer, got 2.0"),
        ('backend = "no spaces"', "backend: not a valid backend name"),
        ('requires = "docker=yes please"', "requires[0]: not a capability tag"),
        ('outputs = ["a/../../b"]', "outputs[0]: 'a/../../b' contains '..'"),
        ('outputs = ["."]', "outputs[0]: '.' does not name a file"),
        ('outputs = ["C:\\\\x"]', "outputs[0]: 'C:\\\\x': use '/' as separator"),
        ("env = { X = [1] }", "env.X: expected a string or a number, got a list"),
        ("env = 3", "env: expected a table, got 3"),
        ("backend_options = { when = 1979-05-27 }", "backend_options.when: date 1979-05-27 cannot be sent"),
        ("[resources]\nmemory = 0", "resources.memory: must be more than 0"),
        ("[resources]\nmemory = 1.5", "resources.memory: expected a size such as '512M'"),
        ("[resources]\ndisk = 0", "resources.disk: must be more than 0"),
        ('[resources]\ndisk = "lots"', "resources.disk: not a size: 'lots'"),
        ('backend = "boinc"\n[resources]\ndisk = "1G"', "resources.disk: only the native backend limits"),
        ('request_disk = "1G"', "unknown field 'request_disk' (did you mean 'resources.disk'?)"),
        ('[runtime]\nkind = "vm"', "runtime.kind: unknown runtime 'vm'"),
        ('[runtime]\nimage = "busybox"', "runtime.image: only allowed with runtime 'docker'"),
        ('[runtime]\nkind = "docker"\nimage = "bad image"', "runtime.image: not a docker image reference"),
        ("[workers]\nmin = 0", "workers.min: expected a positive integer, got 0"),
    ],
)
def test_each_kind_of_error_names_its_field(tmp_path: Path, snippet: str, start: str) -> None:
    problem = one_problem(tmp_path, snippet + '\n[[task]]\nargv = ["true"]\n')
    assert problem.startswith(start), problem


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("", "no tasks: add [[task]] tables"),
        ("[[task]]\nenv = {}\n", "task[0]: missing 'argv'"),
        ("[[task]]\nargv = ['']\n", "task[0].argv[0]: the program to run must not be empty"),
        ("[[task]]\nargv = 'unbalanced \"quote'\n", "task[0].argv: cannot split the command line"),
        ("[sweep]\nargv = ['x']\n", "sweep: give either 'params'"),
        ("[sweep]\nargv = ['x']\ncount = 1\nparams = { a = [1] }\n", "sweep: give either 'params'"),
        ("[sweep]\ncount = 1\n", "sweep: missing 'argv'"),
        ("[sweep]\nargv = ['x']\ncount = 0\n", "sweep.count: expected a positive integer, got 0"),
        ("[sweep]\nargv = ['x']\nparams = {}\n", "sweep.params: needs at least one parameter"),
        ("[sweep]\nargv = ['x']\nparams = { a = [] }\n", "sweep.params.a: needs at least one value"),
        ("[sweep]\nargv = ['x']\nparams = { i = [1] }\n", "sweep.params.i: not a valid parameter name"),
        ("[sweep]\nargv = ['x']\nparams = { a = [{ b = 1 }] }\n", "sweep.params.a[0]: expected a string or a number"),
        ("[sweep]\nargv = ['x']\ncount = 1_000_001\n", "1000001 tasks is more than the limit of 1000000"),
        (
            "[[task]]\nargv = ['setup']\n[sweep]\nargv = ['x']\nparams = { "
            + ", ".join(f"{k} = [0,1,2,3,4,5,6,7,8,9]" for k in "abcdef")
            + " }\n",
            "1000001 tasks is more than the limit of 1000000",
        ),
    ],
)
def test_task_errors(tmp_path: Path, text: str, start: str) -> None:
    problem = one_problem(tmp_path, text)
    assert problem.startswith(start), problem


def test_missing_file_and_syntax_errors_are_job_file_errors(tmp_path: Path) -> None:
    with pytest.raises(JobFileError) as info:
        load_job(tmp_path / "nope.toml")
    assert str(info.value) == f"{tmp_path / 'nope.toml'}: no such file"
    with pytest.raises(JobFileError) as info:
        load_job(tmp_path)
    assert "is a directory" in str(info.value)
    with pytest.raises(JobFileError) as info:
        load_job(write(tmp_path, 'name = "x"\n\nretries = = 3\n'))
    (problem,) = info.value.problems
    assert problem.startswith("line 3, column 11: TOML syntax error")
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(JobFileError, match="not UTF-8"):
        load_job(tmp_path / "latin1.toml")


# ------------------------------------------------------------------------------------------ inputs


def test_missing_input_names_the_resolved_path(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, 'inputs = ["data/missing.csv"]\n[[task]]\nargv = ["true"]\n')
    missing = tmp_path.resolve() / "data" / "missing.csv"
    assert problem.startswith(f"inputs[0]: no such file: '{missing}'")


def test_input_paths_are_relative_to_the_job_file_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sub = tmp_path / "jobs"
    sub.mkdir()
    (sub / "script.py").write_text("")
    path = write(sub, 'inputs = ["script.py"]\n[[task]]\nargv = ["python3", "script.py"]\n')
    monkeypatch.chdir(tmp_path)
    job = load_job(Path("jobs") / path.name)
    assert job.inputs == (InputFile(sub.resolve() / "script.py", "script.py"),)


def test_directory_inputs_are_refused(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    problem = one_problem(tmp_path, 'inputs = ["dir"]\n[[task]]\nargv = ["true"]\n')
    assert problem.startswith("inputs[0]:") and "is not a regular file" in problem


@pytest.mark.parametrize(
    ("dest", "needle"),
    [("../escape.txt", "contains '..'"), ("a/../../b", "contains '..'"), ("/etc/passwd", "is absolute"),
     ("~/x", "is absolute"), ("", "expected a relative path")],
)  # fmt: skip
def test_bad_input_destinations_are_refused(tmp_path: Path, dest: str, needle: str) -> None:
    (tmp_path / "f.txt").write_text("x")
    problem = one_problem(tmp_path, f'inputs = [{{ src = "f.txt", dest = "{dest}" }}]\n[[task]]\nargv = ["true"]\n')
    assert problem.startswith("inputs[0].dest:") and needle in problem, problem


def test_input_destinations_must_not_collide(tmp_path: Path) -> None:
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("other a")
    problems = problems_of(
        tmp_path,
        """
inputs = ["a.txt", "sub/a.txt", { src = "b.txt", dest = "d" }, { src = "c.txt", dest = "d/c.txt" }]
[[task]]
argv = ["true"]
""",
    )
    assert problems == [
        "inputs[1]: destination 'a.txt' is already used by inputs[0]",
        "inputs[3].dest: destination 'd/c.txt' would be inside the file 'd' of inputs[2].dest",
    ]


def test_dest_defaults_to_the_file_name_and_is_normalised(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.csv").write_text("1")
    job = load_job(
        write(
            tmp_path,
            'inputs = ["./data/x.csv", { src = "data/x.csv", dest = "./in//y.csv" }]\n[[task]]\nargv = ["t"]\n',
        )
    )
    assert [f.dest for f in job.inputs] == ["x.csv", "in/y.csv"]


# ------------------------------------------------------------------------------------------ docker


def test_docker_without_image_is_refused(tmp_path: Path) -> None:
    problem = one_problem(tmp_path, '[runtime]\nkind = "docker"\n[[task]]\nargv = ["true"]\n')
    assert problem.startswith("runtime.image: required with runtime 'docker'")


def test_docker_requirement_is_added_once(tmp_path: Path) -> None:
    job = load_job(
        write(
            tmp_path,
            'requires = ["docker", "gpu"]\n[runtime]\nkind = "docker"\nimage = "python:3.11-slim"\nnetwork = true\n'
            '[[task]]\nargv = ["python3", "-c", "print(1)"]\n',
        )
    )
    assert job.requires == ("docker", "gpu")
    assert job.network is True


# ------------------------------------------------------------------------------------------ wire form


def test_round_trip_through_json_is_exact(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("x")
    job = load_job(
        write(
            tmp_path,
            """
name = "rt"
requires = ["site=lab1"]
timeout = 2.5
inputs = [{ src = "in.txt", dest = "sub/in.txt" }]
outputs = ["*.out"]
replicas = 2
[resources]
disk = "300M"
[runtime]
kind = "docker"
image = "busybox:latest"
[workers]
max = 3
[env]
A = "1"
[backend_options]
quorum = 2
nested = { list = [1, 2.5, "x", true], empty = {} }
[[task]]
argv = ["sh", "-c", "echo {i}"]
[sweep]
argv = ["sh", "-c", "echo {x} > {x}.out"]
env = { X = "{x}" }
params = { x = ["a", "b"] }
""",
        )
    )
    wire = json.dumps(job.to_dict())
    back = JobSpec.from_dict(json.loads(wire))
    assert back == job and back.disk_bytes == 300 << 20
    assert back.to_dict() == job.to_dict()
    assert isinstance(back.tasks, tuple) and isinstance(back.inputs[0].source, Path)


def test_to_dict_does_not_share_mutable_state(tmp_path: Path) -> None:
    job = sweep_job(["sim", "{i}"], 2, backend_options={"deep": {"k": [1]}}, env={"A": "1"})
    d = job.to_dict()
    d["backend_options"]["deep"]["k"].append(2)
    d["tasks"][0]["env"]["A"] = "changed"
    assert job.backend_options == {"deep": {"k": [1]}}
    assert job.tasks[0].env == {"A": "1"}


def test_from_dict_validates(tmp_path: Path) -> None:
    good = sweep_job(["sim", "{i}"], 3, name="w", disk="1G").to_dict()

    def problems(**changes: object) -> list[str]:
        d = json.loads(json.dumps(good))
        d.update(changes)
        with pytest.raises(JobFileError) as info:
            JobSpec.from_dict(d)
        return info.value.problems

    assert problems(version=2)[0].startswith("version: unsupported job format version 2")
    assert problems(retries=-1) == ["retries: expected a non-negative integer, got -1"]
    assert problems(name="../x")[0].startswith("name: not a valid job name")
    assert problems(runtime="docker") == [
        "image: required with runtime 'docker' (e.g. image = \"python:3.11-slim\")",
        "requires: a docker job must require the 'docker' capability",
    ]
    assert problems(inputs=[{"source": "relative.txt", "dest": "x"}]) == [
        "inputs[0].source: must be an absolute path, got 'relative.txt'"
    ]
    assert problems(inputs=[{"source": "/a", "dest": "../x"}])[0].startswith("inputs[0].dest: '../x' contains '..'")
    assert problems(timeout_s="10m") == ["timeout_s: expected a number of seconds or null"]
    bad_tasks = json.loads(json.dumps(good["tasks"]))
    bad_tasks[1]["index"] = 7
    bad_tasks[2]["argv"] = "sim 2"
    assert problems(tasks=bad_tasks) == [
        "tasks[1].index: expected 1, got 7",
        "tasks[2].argv: expected a non-empty list of strings",
    ]
    assert problems(tasks=[]) == ["tasks: expected a non-empty list of tasks"]
    assert problems(colour="blue")[0] == "unknown field 'colour' (known fields: " + ", ".join(good) + ")"
    d = dict(good)
    del d["replicas"]
    with pytest.raises(JobFileError, match="missing fields: replicas"):
        JobSpec.from_dict(d)


def test_inputs_need_not_exist_where_the_job_is_received(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("x")
    job = load_job(write(tmp_path, 'inputs = ["in.txt"]\n[[task]]\nargv = ["cat", "in.txt"]\n'))
    d = job.to_dict()
    (tmp_path / "in.txt").unlink()
    assert JobSpec.from_dict(d) == job


# ------------------------------------------------------------------------------------------ short form


def test_short_form_equals_the_equivalent_file(tmp_path: Path) -> None:
    (tmp_path / "sim.py").write_text("")
    short = sweep_job(
        ["python3", "sim.py", "--seed", "{i}"],
        100,
        backend="htcondor",
        base_dir=tmp_path,
        inputs=["sim.py"],
        memory="1G",
        timeout="5m",
        requires=("python3.11",),
        workers_max=None,  # None means "not given"
    )
    from_file = load_job(
        write(
            tmp_path,
            """
backend = "htcondor"
inputs = ["sim.py"]
requires = ["python3.11"]
timeout = "5m"
[resources]
memory = "1G"
[sweep]
argv = ["python3", "sim.py", "--seed", "{i}"]
count = 100
""",
        )
    )
    assert short == from_file
    assert short.name == "sim"
    assert short.tasks[42].argv == ("python3", "sim.py", "--seed", "42")
    assert len(short.tasks) == 100


def test_short_form_defaults_and_name() -> None:
    job = sweep_job(["./render.sh", "frame-{i}.png"], 2)
    assert job.name == "render"
    assert job.backend == "native"
    assert [t.argv for t in job.tasks] == [("./render.sh", "frame-0.png"), ("./render.sh", "frame-1.png")]
    assert sweep_job(["{i}"], 1).name == "job"
    assert sweep_job(["python3", "x.py"], 1, name="given").name == "given"


def test_short_form_errors() -> None:
    with pytest.raises(JobFileError) as info:
        sweep_job(["sim", "{seed}"], 0, cpus=0)
    assert info.value.problems == [
        "resources.cpus: expected a positive integer, got 0",
        "sweep.count: expected a positive integer, got 0",
        "sweep.argv[1]: unknown placeholder '{seed}' (known here: {i}; write '{{' for a literal '{')",
    ]
    assert str(info.value).startswith("<command line>: ")
    with pytest.raises(TypeError, match="did you mean 'retries'"):
        sweep_job(["sim"], 1, retry=3)


def test_ninety_thousand_tasks_are_allowed_and_a_million_too_big_to_send() -> None:
    job = sweep_job(["sim", "--seed", "{i}"], 90_000)
    assert len(job.tasks) == 90_000
    assert job.tasks[-1] == TaskSpec(89_999, ("sim", "--seed", "89999"), {}, {})
    with pytest.raises(JobFileError, match=r"1000000 tasks make 7\d\.\d\d MiB .* split the sweep"):
        sweep_job(["sim", "--seed", "{i}"], 1_000_000)


def test_parse_job_accepts_a_plain_dict(tmp_path: Path) -> None:
    job = parse_job({"name": "d", "task": [{"argv": ["true"]}]}, tmp_path)
    assert job.tasks == (TaskSpec(0, ("true",), {}, {}),)
    with pytest.raises(JobFileError, match=r"^<job>: "):
        parse_job({"task": [{"argv": ["true"]}], "retries": "x"}, tmp_path)


def test_a_job_too_big_for_one_message_is_refused_with_what_would_fit():
    pad = "x" * 1000
    assert len(sweep_job(["true", pad + "{i}"], 2000).tasks) == 2000  # about 2 MiB: fine
    with pytest.raises(JobFileError) as e:
        sweep_job(["true", pad + "{i}"], 9000)
    message = str(e.value)
    assert "9000 tasks make" in message and "split the sweep into several jobs" in message
    fit = int(re.search(r"about (\d+) tasks like these", message).group(1))
    assert 7000 < fit < 8000
    assert len(sweep_job(["true", pad + "{i}"], fit - 50).tasks) == fit - 50  # what it says fits, fits


def test_a_job_recorded_before_disk_limits_existed_still_loads(tmp_path: Path) -> None:
    """Journals outlive the version that wrote them: a job's wire form without `disk_bytes`."""
    wire = sweep_job(["true"], 3).to_dict()
    assert "disk_bytes" not in wire  # nor sent to nodes of that version, which would refuse it
    assert JobSpec.from_dict(wire).disk_bytes is None
    assert sweep_job(["true"], 3, disk="2G").disk_bytes == 2 << 30
    moved = sweep_job(["true"], 3, disk="2G").to_dict() | {"backend": "htcondor"}  # `submit --backend` on a file
    with pytest.raises(JobFileError, match="disk_bytes: only the native backend limits a task's disk"):
        JobSpec.from_dict(moved)
