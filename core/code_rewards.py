"""Code rewards: a completion's program run in the sandbox (`core/sandbox.py`) against the
record's tests. 1.0 only when the harness reports every case passed; never on an exit code.

* `code_io`: APPS-style cases as Eurus-2-RL-Data (the EffOPD paper's Eurus-RL-Code) stores them in
  `reward_model.ground_truth`: a JSON string `{"inputs": [...], "outputs": [...]}` run as
  stdin -> stdout (compared token by token), or with `"fn_name"` as calls `fn(*inputs[i])` whose
  return value must equal `outputs[i]` (or `[value] == outputs[i]`). Only the inputs enter the
  sandbox; the harness reports each case's output and it is compared here.
* `python_tests`: Python test code (asserts) run after the completion's code in one interpreter;
  passes when the harness reports this call's nonce, which it writes once the tests ran to the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from core.sandbox import Limits, Outcome, SandboxUnavailable, detect, new_nonce, run_harness, weaker_than_bwrap

log = logging.getLogger(__name__)
_warned: set[str] = set()


def completion_code(completion: str) -> str:
    """The code of a completion: its last ```python (or bare ```) block, else the whole text."""
    blocks = re.findall(r"```(?:python)?\n(.*?)```", completion, flags=re.S)
    return blocks[-1] if blocks else completion


def parse_cases(tests: Any) -> dict | None:
    """The cases of a `code_io` answer, or None when they are malformed or empty (nothing to pass)."""
    try:
        cases = json.loads(tests) if isinstance(tests, str) else tests
    except json.JSONDecodeError:
        return None
    if not isinstance(cases, dict):
        return None
    inputs, outputs = cases.get("inputs"), cases.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs) or not inputs:
        return None
    fn = cases.get("fn_name")
    if fn is not None and not (isinstance(fn, str) and fn.isidentifier()):
        return None
    return {"inputs": inputs, "outputs": outputs, "fn_name": fn}


def case_passed(report: dict, want: Any, call: bool) -> bool:
    """One case: the output the harness reported against the expected one."""
    if not isinstance(report.get("out"), str):
        return False
    if call:
        try:
            got = json.loads(report["out"])
        except json.JSONDecodeError:
            return False
        return got == want or [got] == want
    return report["out"].split() == str(want).split()


def all_reported(outcome: Outcome, n: int) -> list[dict] | None:
    """The reports of cases 0..n-1, one each and nothing else, or None."""
    if outcome.timed_out or outcome.overflowed or len(outcome.reports) != n:
        return None
    if [r.get("case") for r in outcome.reports] != list(range(n)):
        return None
    return outcome.reports


def code_io_check(completion: str, tests: Any, limits: Limits, isolation: str) -> float:
    cases = parse_cases(tests)
    if cases is None:
        return 0.0
    spec = {"inputs": cases["inputs"], "fn_name": cases["fn_name"]}  # the outputs stay out of the sandbox
    reports = all_reported(run_harness("io", completion_code(completion), spec, limits, isolation), len(cases["inputs"]))
    if reports is None:
        return 0.0
    call = cases["fn_name"] is not None
    return float(all(case_passed(r, want, call) for r, want in zip(reports, cases["outputs"])))


def python_tests_check(completion: str, tests: Any, limits: Limits, isolation: str) -> float:
    if not isinstance(tests, str) or not tests.strip():
        return 0.0
    nonce = new_nonce()
    out = run_harness("tests", completion_code(completion), {"tests": tests}, limits, isolation, nonce)
    return float(not out.timed_out and not out.overflowed and out.reports == [{"passed": nonce}])


CHECKS: dict[str, Callable[[str, Any, Limits, str], float]] = {"code_io": code_io_check,
                                                              "python_tests": python_tests_check}


def sandbox_tags(task_cfg: Any) -> dict[str, str]:
    """MLflow tags for a run's code rewards: {"sandbox/isolation": bwrap | uid | none} (said in the
    log when weaker than bwrap); {} for other tasks."""
    if getattr(task_cfg, "reward", None) not in CHECKS:
        return {}
    iso = detect(task_cfg.sandbox.isolation)
    if iso != "bwrap":
        log.warning(weaker_than_bwrap(iso))
    return {"sandbox/isolation": iso}


def check_sandbox(task_cfg: Any) -> str | None:
    """Before launch: why this machine cannot run the task's code rewards as configured, or None."""
    if getattr(task_cfg, "reward", None) not in CHECKS:
        return None
    try:
        iso = detect(task_cfg.sandbox.isolation)
    except SandboxUnavailable as err:
        return str(err)
    if task_cfg.sandbox.require_isolation and iso != "bwrap":
        return weaker_than_bwrap(iso).replace("; set task.sandbox.require_isolation to refuse", "")
    return None


class CodeReward:
    """`reward(completion, answer) -> 0.0 | 1.0` for a code task, bound to its sandbox settings
    (`task.sandbox`); `many` checks a batch in parallel (each check is a subprocess)."""

    def __init__(self, kind: str, sandbox_cfg: Any) -> None:
        self.kind, self.cfg, self.limits = kind, sandbox_cfg, Limits.of(sandbox_cfg)
        self._isolation: str | None = None

    @property
    def isolation(self) -> str:
        """Resolved on first use in this process: refused, or said once, when weaker than bwrap."""
        if self._isolation is None:
            iso = detect(self.cfg.isolation)
            if iso != "bwrap":
                if self.cfg.require_isolation:
                    raise SandboxUnavailable(f"task.sandbox.require_isolation is set and {weaker_than_bwrap(iso)}")
                if iso not in _warned:
                    _warned.add(iso)
                    log.warning(weaker_than_bwrap(iso))
            self._isolation = iso
        return self._isolation

    def __call__(self, completion: str, answer: Any) -> float:
        return CHECKS[self.kind](completion, answer, self.limits, self.isolation)

    def many(self, completions: list[str], answers: list[Any]) -> list[float]:
        isolation = self.isolation
        workers = min(self.parallel(), max(len(completions), 1))
        if workers == 1:
            return [CHECKS[self.kind](c, a, self.limits, isolation) for c, a in zip(completions, answers)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda ca: CHECKS[self.kind](ca[0], ca[1], self.limits, isolation),
                                 zip(completions, answers)))

    def parallel(self) -> int:
        """`task.sandbox.parallel`, else the CPUs Ray assigned this actor (at least 1), else this machine's."""
        if self.cfg.parallel:
            return self.cfg.parallel
        try:
            import ray

            if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
                return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        except Exception:  # noqa: BLE001 - outside an actor
            pass
        return max(1, len(os.sched_getaffinity(0)))
