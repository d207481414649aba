"""A sandbox for model-written code (the `python_tests` and `code_io` rewards).

A policy trained on a reward finds the reward's holes, so the program is untrusted. It runs under a
trusted harness (`HARNESS`, written next to it) in a fresh folder, and:

* the verdict never comes from the exit code. The harness writes one report line per case over a
  channel of its own (a duplicate of the original stdout; the program's fds 0-2 are /dev/null and
  its `print` goes to a buffer). `code_io` reports each case's *output* and this process compares it
  with the expected one, which never enters the sandbox; `python_tests` reports a per-call nonce once
  the tests ran to the end. A program that exits, kills or replaces the harness leaves cases
  unreported and fails.
* the environment is scrubbed (PATH and LANG only), the program runs in a new session, and
  everything it started is killed when the call returns (or times out);
* rlimits: address space, CPU seconds, file size, processes (where it has a uid of its own), no core
  files; the report is read up to a cap;
* isolation, the strongest this machine allows (`detect`):
    bwrap  bubblewrap as an unused uid of its own: /usr (and the interpreter) read-only, the call's
           folder the only writable path besides a private /tmp, its own network namespace (no
           interface but an unconfigured loopback), PID, IPC and UTS namespaces (it cannot see or
           signal anything outside; all of it dies with the sandbox);
    uid    root without bubblewrap: the program runs as an unused uid of its own (a slot, locked
           machine-wide), so it cannot signal the worker or write what the worker owns; on return
           every process of that uid is killed (detached ones included) and its files in the
           world-writable folders are removed. It can read what the world may read and use the network;
    none   not root, no bubblewrap: scrubbed environment, session kill and limits only; a detached
           process can survive and files and network are open (`require_isolation` refuses this).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

ISOLATIONS = ("bwrap", "uid", "none")
"""Strongest first."""
SLOT_BASE = 1_990_000_000
"""Sandbox uids are SLOT_BASE + i: far above any account's (Linux uids go to 2^32 - 2)."""
SLOTS = 256
LOCK_DIR = Path(tempfile.gettempdir()) / "foresight-sandbox-slots"
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")


class SandboxUnavailable(RuntimeError):
    """The isolation asked for cannot be had on this machine."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 2048
    file_mb: int = 16
    processes: int = 16
    output_kb: int = 1024

    @classmethod
    def of(cls, cfg) -> "Limits":
        """From a `SandboxConfig` (or anything with the same fields)."""
        return cls(cfg.timeout_s, cfg.cpu_s, cfg.memory_mb, cfg.file_mb, cfg.processes, cfg.output_kb)


@dataclass(frozen=True)
class Outcome:
    reports: list[dict]
    """The harness's report lines, parsed, in order (lines that are not JSON objects are dropped)."""
    timed_out: bool
    overflowed: bool
    """The report passed `output_kb`: reading stopped and the program was killed."""


# ----------------------------------------------------------------------------- the trusted harness
HARNESS = r'''
import io, json, os, resource, sys

def _run():
    head = json.loads(sys.stdin.readline())
    for name, value in head["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    report = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    with open("spec.json") as f:
        spec = json.load(f)
    os.unlink("spec.json")
    with open("solution.py") as f:
        code = f.read()
    cap = head["cap"]

    def say(**line):
        report.write(json.dumps(line) + "\n")
        report.flush()

    if head["mode"] == "tests":
        nonce, head = head["nonce"], None
        try:
            sys.stdout = sys.stderr = io.StringIO()
            exec(compile(code + "\n\n" + spec["tests"] + "\n", "solution.py", "exec"), {"__name__": "__main__"})
        except BaseException:
            return
        say(passed=nonce)
        return
    fn = spec.get("fn_name")
    for i, given in enumerate(spec["inputs"]):
        scope = {"__name__": "__main__"}
        out = io.StringIO()
        sys.stdout = sys.stderr = out
        try:
            if fn:  # call-based: the inputs are the arguments; the return value is the output
                exec(code, scope)
                target = scope[fn] if fn in scope else getattr(scope["Solution"](), fn)
                got = target(*given) if isinstance(given, list) else target(given)
                text = json.dumps(got)
            else:  # stdin -> stdout; a program may end itself with exit() once it has printed
                sys.stdin = io.StringIO(given if isinstance(given, str) else "\n".join(map(str, given)))
                try:
                    exec(code, scope)
                except SystemExit:
                    pass
                text = out.getvalue()
        except BaseException as err:
            say(case=i, error=type(err).__name__)
            continue
        if len(text) > cap:
            say(case=i, error="output too long")
        else:
            say(case=i, out=text)

_run()
os._exit(0)
'''


# ----------------------------------------------------------------------------- detection
def interpreter() -> str:
    """A Python every uid may run, for the harness (stdlib only): this one's base interpreter when
    its path is world-readable, else the system's."""
    import sys

    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    if _world_reachable(base):
        return base
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(path) and _world_reachable(os.path.realpath(path)):
            return os.path.realpath(path)
    return base


def _world_reachable(path: str) -> bool:
    parts = Path(path).parents
    return all(p.stat().st_mode & stat.S_IXOTH for p in parts) and bool(os.stat(path).st_mode & stat.S_IXOTH)


def _bwrap_args(folder: str, python: str) -> list[str]:
    """bubblewrap: system read-only, `folder` writable at /sandbox, private /tmp, all namespaces new."""
    args = ["bwrap", "--ro-bind", "/usr", "/usr"]
    for top in ("bin", "lib", "lib64", "sbin"):
        p = Path("/") / top
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), str(p)]
        elif p.is_dir():
            args += ["--ro-bind", str(p), str(p)]
    prefix = str(Path(python).parents[1])
    if not prefix.startswith("/usr"):
        args += ["--ro-bind", prefix, prefix]
    return args + ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--bind", folder, "/sandbox",
                   "--chdir", "/sandbox", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
                   *[a for k, v in ENV.items() for a in ("--setenv", k, v)]]


@lru_cache(maxsize=None)
def probe(isolation: str) -> str | None:
    """None when `isolation` works here, else why not (tried once per process)."""
    if isolation == "none":
        return None
    if os.geteuid() != 0:
        if isolation == "uid":
            return "needs root (to run the program as a uid of its own)"
    if isolation == "bwrap":
        if shutil.which("bwrap") is None:
            return "bubblewrap (bwrap) is not installed (Debian: apt-get install bubblewrap)"
        try:
            out = run_harness("io", "print(input())", {"inputs": ["ok"]}, Limits(timeout_s=30), isolation)
        except OSError as err:
            return f"bwrap failed to start: {err}"
        if [r.get("out") for r in out.reports] != ["ok\n"]:
            return "bwrap cannot create its namespaces here (a container that forbids them?)"
    return None


def detect(wanted: str = "auto") -> str:
    """The isolation to use: `wanted` if it works here (else SandboxUnavailable), or for `auto` the
    strongest that does."""
    if wanted != "auto":
        why = probe(wanted)
        if why:
            raise SandboxUnavailable(f"sandbox isolation {wanted!r} is not available here: {why}")
        return wanted
    return next(i for i in ISOLATIONS if probe(i) is None)


def weaker_than_bwrap(isolation: str) -> str:
    """The log line for a run whose code rewards run without bubblewrap."""
    what = {"uid": "a uid of its own (processes and the worker's files protected; network and world-readable "
                   "files open)",
            "none": "no isolation (environment scrubbed, limits set; files, network and detached processes open)"}
    why = probe("bwrap") or "task.sandbox.isolation chose it"
    return f"code rewards run with {what[isolation]}: {why}; set task.sandbox.require_isolation to refuse"


# ----------------------------------------------------------------------------- running
@contextmanager
def _slot() -> Iterator[int]:
    """An unused sandbox uid, locked machine-wide (flock: released if this process dies). A slot whose
    last holder died mid-call ("busy" left in its lock file) is cleaned up first."""
    LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
    for i in range(SLOTS):
        f = open(LOCK_DIR / str(i), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        uid = SLOT_BASE + i
        try:
            f.seek(0)
            if f.read():
                _kill_uid(uid)
                _remove_owned(uid)
            f.truncate(0)
            f.write("busy")
            f.flush()
            yield uid
            f.truncate(0)
        finally:
            f.close()
        return
    raise SandboxUnavailable(f"all {SLOTS} sandbox uids are in use")


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (kill(-1) as that uid reaches exactly those; twice, for forks in flight)."""
    for _ in range(2):
        subprocess.run(["kill", "-KILL", "-1"], user=uid, group=uid, extra_groups=[], env=ENV,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


_ww_dirs: tuple[float, set[str]] = (0.0, set())
WALK_EVERY_S = 60.0


def _world_writable_dirs() -> set[str]:
    """Folders anyone may write to, under WORLD_WRITABLE (those roots included), walked at most once a
    minute (a Ray node alone makes a dozen of them)."""
    global _ww_dirs
    walked, found = _ww_dirs
    if time.monotonic() - walked < WALK_EVERY_S:
        return found
    found, stack = set(), list(WORLD_WRITABLE)
    while stack:
        d = stack.pop()
        found.add(d)
        try:
            for e in os.scandir(d):
                if e.is_dir(follow_symlinks=False) and e.stat(follow_symlinks=False).st_mode & stat.S_IWOTH:
                    stack.append(e.path)
        except OSError:
            continue
    _ww_dirs = (time.monotonic(), found)
    return found


def _remove_owned(uid: int, since: float = 0.0) -> None:
    """Remove what `uid` left in folders anyone may write to. Only folders modified after `since`
    (epoch seconds) are listed: creating, renaming or removing an entry updates its folder's mtime."""
    dirs = _world_writable_dirs()
    stack = [d for d in dirs if _mtime(d) >= since]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid == uid:
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(e.path, ignore_errors=True)
                else:
                    os.unlink(e.path)
            elif stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH and e.path not in dirs:
                dirs.add(e.path)  # new since the last walk
                stack.append(e.path)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


def _read_capped(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bool, bool]:
    """(stdout, timed out, overflowed): read until EOF, the deadline or `cap` bytes."""
    buf = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(buf), True, False
            if not sel.select(timeout=left):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                return bytes(buf), False, False
            buf += chunk
            if len(buf) > cap:
                return bytes(buf[:cap]), False, True


def run_harness(mode: str, code: str, spec: dict, limits: Limits, isolation: str, nonce: str = "") -> Outcome:
    """Run `code` under the harness in `mode` (`io`: report each case's output; `tests`: report
    `nonce` once `spec["tests"]` ran to the end) with `limits`, isolated as `isolation`."""
    own_uid = isolation in ("bwrap", "uid")
    rlimits = {"RLIMIT_AS": limits.memory_mb << 20, "RLIMIT_CPU": limits.cpu_s,
               "RLIMIT_FSIZE": limits.file_mb << 20, "RLIMIT_CORE": 0}
    if own_uid:
        rlimits["RLIMIT_NPROC"] = limits.processes
    head = {"mode": mode, "rlimits": rlimits, "cap": limits.output_kb << 10, "nonce": nonce}
    with (_slot() if own_uid else _no_slot()) as uid, \
            tempfile.TemporaryDirectory(prefix="foresight-sbx-", ignore_cleanup_errors=True) as folder:
        for name, text in (("harness.py", HARNESS), ("solution.py", code), ("spec.json", json.dumps(spec))):
            Path(folder, name).write_text(text)
        python = interpreter()
        argv = [python, "-I", "harness.py"]
        if uid is not None:
            for p in Path(folder).iterdir():
                os.chown(p, uid, uid)
            os.chown(folder, uid, uid)
        if isolation == "bwrap":
            argv = _bwrap_args(folder, python) + argv
        ids = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
        started = time.time() - 1.0  # folder mtimes tick coarsely: a second's margin
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                cwd=folder, env=ENV, start_new_session=True, close_fds=True, **ids)
        try:
            try:
                proc.stdin.write((json.dumps(head) + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            raw, timed_out, overflowed = _read_capped(proc, time.monotonic() + limits.timeout_s,
                                                      (limits.output_kb << 10) + 4096)
        finally:
            _end(proc, uid, isolation == "bwrap", started)
    reports = []
    for line in raw.decode("utf-8", "replace").splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict):
            reports.append(item)
    return Outcome(reports, timed_out, overflowed)


@contextmanager
def _no_slot() -> Iterator[None]:
    yield None


def _end(proc: subprocess.Popen, uid: int | None, bwrapped: bool, since: float) -> None:
    """Kill the session (bwrap: the whole PID namespace with it) and, with a uid of its own,
    every process of that uid and its files in the world-writable folders."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    proc.stdout.close()
    _await_group_exit(proc.pid)
    if uid is not None:
        _kill_uid(uid)
        if not bwrapped:  # bwrap: /tmp was private and nothing else world-writable was mounted
            _remove_owned(uid, since)


def _await_group_exit(pgid: int, timeout_s: float = 2.0) -> None:
    """Wait until no live process of process group `pgid` is left. SIGKILL is asynchronous: a
    killed child (one in the middle of an exec, say) still runs its exit for a moment after
    killpg returns. Zombies are dead already (they await their reaper and hold nothing)."""
    deadline = time.monotonic() + timeout_s
    while _live_in_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _live_in_group(pgid: int) -> bool:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):  # fields: state, ppid, pgrp, ...
            return True
    return False


def new_nonce() -> str:
    return secrets.token_hex(16)
