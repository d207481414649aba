"""Code rewards in the sandbox (core/sandbox.py, core/code_rewards.py), against an
attack corpus: every attack is run under each isolation this machine offers and asserts both the
reward and that nothing was left behind (processes, files, connections).

Right programs score 1.0 and wrong ones 0.0 in every mode; what only some modes guarantee (see the
module docstring of core/sandbox.py) is asserted only there: `none` cannot stop a detached
process, a write to /tmp or a connection, and without bubblewrap the network is open.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.code_rewards import CodeReward, code_io_check, python_tests_check
from core.config import SandboxConfig
from core.sandbox import SLOT_BASE, Limits, probe

MODES = [pytest.param(m, marks=pytest.mark.skipif(probe(m) is not None, reason=f"{m}: {probe(m)}"))
         for m in ("bwrap", "uid", "none")]
ISOLATED = [m for m in MODES if m.values[0] != "none"]
LIMITS = Limits(timeout_s=4, cpu_s=4, memory_mb=512, file_mb=1, processes=16, output_kb=64)
ADD = json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})
SOLVE = "a, b = map(int, input().split())\nprint(a + b)\n"


def program(attack: str) -> str:
    """A completion whose program misbehaves, then solves the problem."""
    return f"```python\nimport os, sys, time\n{attack}\n{SOLVE}```"


def processes_with(marker: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(int(pid))
            except OSError:
                pass
    return out


def sandbox_processes() -> list[int]:
    """Live processes of a sandbox uid (bwrap and uid isolation); killed ones await their reaper as
    zombies for a moment, which holds nothing."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(status["Uid"].split()[0]) >= SLOT_BASE and not status["State"].strip().startswith("Z"):
            out.append(int(pid))
    return out


def sleeper(marker: str, detach: bool) -> str:
    """Attack code: start a process that outlives the program (`detach`: double fork + setsid, its
    fds closed so it does not hold the report pipe open)."""
    body = f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(600)', '{marker}'])"
    if not detach:
        return f"if os.fork() == 0:\n    {body}\n"
    return (f"if os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        os.closerange(0, 64)\n"
            f"        {body}\n    os._exit(0)\ntime.sleep(0.2)\n")


# ----------------------------------------------------------------------------- what must work
@pytest.mark.parametrize("mode", MODES)
def test_right_programs_pass_and_wrong_ones_fail(mode):
    """The reward path of experiments/paper_grid_code.yaml (code_io: stdin/stdout and call cases) and
    of python_tests: right programs 1.0; wrong, crashing, hanging and malformed-case ones 0.0."""
    stdio = json.dumps({"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7"]})
    right = "Reading both numbers:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    check = lambda c, t: code_io_check(c, t, LIMITS, mode)  # noqa: E731
    assert check(right, stdio) == 1.0
    assert check(right.replace("print(a + b)", "print(a + b)\nexit()"), stdio) == 1.0  # ends itself after printing
    assert check(right.replace("a + b", "a - b"), stdio) == 0.0
    assert check("```python\nraise ValueError\n```", stdio) == 0.0
    assert code_io_check("while True: pass", stdio, Limits(timeout_s=0.5), mode) == 0.0
    assert check(right, "not json") == 0.0 and check(right, '{"inputs": [1], "outputs": []}') == 0.0
    assert check(right, '{"inputs": [], "outputs": []}') == 0.0  # no cases: nothing was shown to pass
    calls = json.dumps({"fn_name": "add", "inputs": [[1, 2], [5, 5]], "outputs": [3, 10]})
    assert check("```python\ndef add(a, b):\n    return a + b\n```", calls) == 1.0
    assert check("```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```", calls) == 1.0
    assert check("```python\ndef add(a, b):\n    return a * b\n```", calls) == 0.0
    assert check("```python\ndef add(a, b):\n    return {a, b}\n```", calls) == 0.0  # not JSON: no output
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    tcheck = lambda c, t: python_tests_check(c, t, LIMITS, mode)  # noqa: E731
    assert tcheck("Here you go:\n```python\ndef add(a, b):\n    return a + b\n```", tests) == 1.0
    assert tcheck("```python\ndef add(a, b):\n    return a - b\n```", tests) == 0.0
    assert python_tests_check("while True: pass", "assert True", Limits(timeout_s=0.5), mode) == 0.0


def test_a_batch_is_checked_in_parallel_in_order():
    reward = CodeReward("code_io", SandboxConfig(parallel=4, timeout_s=4))
    texts = [program("") if i % 3 else program("").replace("a + b", "a * b") for i in range(12)]
    assert reward.many(texts, [ADD] * 12) == [float(i % 3 != 0) for i in range(12)]


# ----------------------------------------------------------------------------- attacks, every mode
EXITS = {
    "sys.exit(0)": "sys.exit(0)",
    "os._exit(0)": "os._exit(0)",
    "SIGKILL itself": "import signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "replace the harness": "os.execv(sys.executable, [sys.executable, '-c', 'print(3)'])",
    "exit from atexit": "import atexit\natexit.register(lambda: os._exit(0))\nsys.exit(0)",
    "forge reports": "for fd in (1, 3, 4):\n    try:\n        os.write(fd, b'{\"case\": 0, \"out\": \"4\\\\n\"}\\n{\"passed\": \"x\"}\\n')\n"
                     "    except OSError:\n        pass\nos._exit(0)",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attack", list(EXITS))
def test_a_program_that_ends_or_replaces_the_harness_fails(mode, attack):
    code = f"```python\nimport os, sys\n{EXITS[attack]}\n```"
    assert code_io_check(code, ADD, LIMITS, mode) == 0.0
    assert python_tests_check(code, "assert True", LIMITS, mode) == 0.0
    calls = json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [1]})
    assert code_io_check(code.replace("```\n", "def f(x):\n    return x\n```\n", 1), calls, LIMITS, mode) == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_the_environment_is_scrubbed(mode, monkeypatch):
    secret = secrets.token_hex(8)
    monkeypatch.setenv("FORESIGHT_TEST_TOKEN", secret)
    cases = json.dumps({"inputs": [""], "outputs": [secret]})
    leak = "```python\nimport os\nprint(os.environ.get('FORESIGHT_TEST_TOKEN', 'scrubbed'))\n```"
    assert code_io_check(leak, cases, LIMITS, mode) == 0.0
    keys = json.dumps({"inputs": [""], "outputs": ["LANG PATH PYTHONDONTWRITEBYTECODE PYTHONHASHSEED"]})
    show = "```python\nimport os\nprint(*sorted(k for k in os.environ if k not in ('LC_CTYPE', 'PWD')))\n```"
    assert code_io_check(show, keys, LIMITS, mode) == 1.0


@pytest.mark.parametrize("mode", MODES)
def test_memory_and_output_floods_fail_fast(mode):
    for attack in ("x = bytearray(8 << 30)",                    # past the address-space limit
                   "while True:\n    print('x' * 100000)",      # the program's own output: into its buffer
                   "while True:\n    os.write(3, b'x' * 65536)"):  # the report channel: read up to the cap
        t0 = time.monotonic()
        assert code_io_check(program(attack), ADD, LIMITS, mode) == 0.0, attack
        assert time.monotonic() - t0 < LIMITS.timeout_s + 2, attack


@pytest.mark.parametrize("mode", MODES)
def test_children_in_the_session_die_with_the_call(mode):
    marker = "fsx" + secrets.token_hex(6)
    assert code_io_check(program(sleeper(marker, detach=False)), ADD, LIMITS, mode) == 1.0  # it did solve it
    assert processes_with(marker) == []


# ----------------------------------------------------------------------------- attacks, isolated modes
@pytest.mark.parametrize("mode", ISOLATED)
def test_detached_processes_do_not_outlive_the_call(mode):
    marker = "fsx" + secrets.token_hex(6)
    assert code_io_check(program(sleeper(marker, detach=True)), ADD, LIMITS, mode) == 1.0
    assert processes_with(marker) == [] and sandbox_processes() == []


@pytest.mark.parametrize("mode", ISOLATED)
def test_a_fork_bomb_is_bounded_and_cleaned_up(mode):
    bomb = "for _ in range(10000):\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    assert code_io_check(f"```python\nimport os\n{bomb}```", ADD, LIMITS, mode) == 0.0  # it prints nothing
    assert time.monotonic() - t0 < LIMITS.timeout_s + 2
    assert sandbox_processes() == []


@pytest.mark.parametrize("mode", ISOLATED)
def test_writes_outside_the_folder_are_refused_or_removed(mode, tmp_path):
    marker = "fsx" + secrets.token_hex(6)
    root_owned = tmp_path / "worker-file"
    root_owned.write_text("mine")
    targets = [f"/tmp/{marker}", f"/var/tmp/{marker}", f"/dev/shm/{marker}", str(Path.cwd() / marker),
               str(root_owned), f"/tmp/{marker}-dir/inner"]
    attack = (f"os.makedirs('/tmp/{marker}-dir', exist_ok=True)\n"
              f"for path in {targets!r}:\n    try:\n        open(path, 'w').write('pwned')\n"
              "    except OSError:\n        pass\n")
    assert code_io_check(program(attack), ADD, LIMITS, mode) == 1.0
    assert root_owned.read_text() == "mine"
    assert [t for t in targets[:4] if os.path.exists(t)] == [] and not os.path.exists(f"/tmp/{marker}-dir")


@pytest.mark.parametrize("mode", ISOLATED)
def test_signals_cannot_reach_the_worker(mode):
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        attack = (f"import signal\nfor pid in ({victim.pid}, {os.getpid()}, os.getppid()):\n    try:\n"
                  "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n")
        assert code_io_check(program(attack), ADD, LIMITS, mode) == 1.0
        assert victim.poll() is None  # still running, as is this test
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("mode", [m for m in ISOLATED if m.values[0] == "bwrap"])
def test_no_network_not_even_loopback(mode):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.5)
        port = server.getsockname()[1]
        attack = (f"import socket\ns = socket.socket()\ns.settimeout(1)\n"
                  f"print('connected' if s.connect_ex(('127.0.0.1', {port})) == 0 else 'refused')\n")
        cases = json.dumps({"inputs": [""], "outputs": ["connected"]})
        assert code_io_check(f"```python\n{attack}```", cases, LIMITS, mode) == 0.0
        with pytest.raises(socket.timeout):
            server.accept()


# ----------------------------------------------------------------------------- configuration and the run's path
def test_paper_grid_code_reward_path_scores_right_and_wrong_programs(tmp_path, fake_models):
    """experiments/paper_grid_code.yaml's task (verl parquet, chat prompts, code_io cases as a JSON string
    in reward_model.ground_truth) loaded as the actors load it; a batch scored through `Task.rewards`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.config import load_config, read_yaml
    from core.task import build_task

    rows = [{"prompt": [{"role": "user", "content": "Add two numbers."}], "data_source": "eurus",
             "reward_model": {"style": "rule", "ground_truth": json.dumps({"inputs": ["1 2\n", "5 5\n"], "outputs": ["3", "10"]})}},
            {"prompt": [{"role": "user", "content": "Write add(a, b)."}], "data_source": "eurus",
             "reward_model": {"style": "rule", "ground_truth": json.dumps({"fn_name": "add", "inputs": [[1, 2]], "outputs": [3]})}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    base = read_yaml(Path(__file__).parents[1] / "experiments" / "paper_grid_code.yaml")["base"]["task"]
    overrides = [f"task.{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in base.items()
                 if k not in ("train_path", "test_path", "chat_template_kwargs")]
    cfg = load_config(None, model_overrides_for(fake_models) + overrides + [
        f"task.train_path={tmp_path / 'train.parquet'}", f"task.test_path={tmp_path / 'test.parquet'}"])
    assert (cfg.task.format, cfg.task.reward) == ("verl", "code_io")
    task = build_task(cfg.task, cfg.model_paths[0])
    stdio, call = [e.answer for e in task.train]
    programs = ["```python\na, b = map(int, input().split())\nprint(a + b)\n```",
                "```python\na, b = map(int, input().split())\nprint(a * b)\n```",
                "```python\nimport sys\nsys.exit(0)\n```",
                "```python\ndef add(a, b):\n    return a + b\n```",
                "```python\ndef add(a, b):\n    return a - b\n```"]
    assert task.rewards(programs, [stdio, stdio, stdio, call, call]) == [1.0, 0.0, 0.0, 1.0, 0.0]


def model_overrides_for(models: Path) -> list[str]:
    return [f"models.student={models / 'student'}", f"models.teacher={models / 'teacher'}"]


def test_isolation_that_cannot_be_had_is_refused_before_launch(tmp_path, fake_models, monkeypatch, caplog):
    from core import sandbox
    from core.code_rewards import sandbox_tags
    from core.config import ConfigError, load_config
    from orchestrator.plan import check_sandbox
    from core.sandbox import SandboxUnavailable

    monkeypatch.setattr(sandbox, "probe", lambda iso: "bubblewrap (bwrap) is not installed" if iso == "bwrap" else None)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "answer": ADD}) + "\n")
    base = model_overrides_for(fake_models) + ["task.type=jsonl", "task.reward=code_io", f"task.train_path={data}",
                                               f"task.test_path={data}"]
    with pytest.raises(ConfigError) as err:
        check_sandbox(load_config(None, base + ["task.sandbox.isolation=bwrap"]), "x.yaml")
    assert err.value.key == "task.sandbox.isolation" and "bubblewrap (bwrap) is not installed" in err.value.reason
    with pytest.raises(ConfigError) as err:
        check_sandbox(load_config(None, base + ["task.sandbox.require_isolation=true"]), "x.yaml")
    assert err.value.key == "task.sandbox.require_isolation"
    cfg = load_config(None, base)
    check_sandbox(cfg, "x.yaml")  # auto: the strongest available, said in the log and the run's tags
    expected = "uid" if os.geteuid() == 0 else "none"
    assert sandbox_tags(cfg.task) == {"sandbox/isolation": expected}
    assert "code rewards run with" in caplog.text and "require_isolation" in caplog.text
    with pytest.raises(SandboxUnavailable, match="require_isolation"):
        CodeReward("code_io", SandboxConfig(require_isolation=True))("x", ADD)
