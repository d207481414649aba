"""Helpers of the end-to-end tests: run the CLI in the background, wait for checkpoints, read the
MLflow store, compare two runs' metric histories."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, TEST_ENV, run_overrides

SMOKE = str(ROOT / "experiments" / "smoke.yaml")
TWIN_SMALL_EVAL = ("eval.num_examples=100", "eval.sets.held.num_examples=40")
"""experiments/math_twin.yaml with smaller evaluations, for the tests' short runs."""


def mlflow_run(out: Path, name: str = "smoke", experiment: str = "smoke"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name]
    return client, runs


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def start_run(models: Path, out: Path, *extra: str, config: str = SMOKE, env: dict | None = None) -> subprocess.Popen:
    """`foresight run` in the background, in a session of its own (so its whole tree can be killed)."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "run", config, *run_overrides(models, out), *extra],
                            cwd=ROOT, env={**os.environ, **TEST_ENV, **(env or {})}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run exited early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def latest(out: Path, name: str = "smoke") -> str:
    p = out / name / "checkpoints" / "latest"
    return p.read_text().strip() if p.is_file() else ""


def reached(out: Path, step: int, name: str = "smoke"):
    """Predicate: the run's newest complete checkpoint is at `step` or later."""
    return lambda: latest(out, name) >= f"step{step:07d}"


def assert_student_learned(client, run_id: str, min_gain: float = 0.05, kl_drop: float = 0.2) -> None:
    """The student moved toward the teacher: reverse KL (mean of the last 10 steps vs the first 10)
    down by `kl_drop`, test accuracy up by `min_gain`."""
    kl = [v for _, v in history(client, run_id, "train/reverse_kl")]
    acc = history(client, run_id, "eval/accuracy")
    assert sum(kl[-10:]) <= (1 - kl_drop) * sum(kl[:10]), f"reverse KL {sum(kl[:10]) / 10:.3f} -> {sum(kl[-10:]) / 10:.3f}"
    assert acc[-1][1] - acc[0][1] >= min_gain, f"accuracy went {acc[0][1]:.3f} -> {acc[-1][1]:.3f}"


def assert_same_metrics(client, run_id: str, ref_client, ref_id: str,
                        keys: tuple[str, ...] = ("train/loss", "train/reverse_kl", "train/reward", "eval/accuracy")) -> None:
    """Same steps (no duplicates, no gaps) and the same values (CPU determinism) as the reference."""
    for key in keys:
        got, want = history(client, run_id, key), history(ref_client, ref_id, key)
        assert [s for s, _ in got] == [s for s, _ in want], f"{key}: steps differ (duplicates or gaps)"
        for (s, a), (_, b) in zip(got, want):
            assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), f"{key} at step {s}: {a} != {b}"


def addition_files(folder: Path, k: int = 4, temperature: float = 1.0) -> list[str]:
    """The embedded addition problems as plain jsonl files (train 200, test 40) and overrides that run
    them as a file task with the test file also scored as the named evaluation set `held` (greedy,
    mean/pass at k samples): a file-task workload the shipped models can score."""
    import json

    from core.config import AdditionTask
    from core.task import build_task

    task = build_task(AdditionTask())
    paths = {}
    for split, n in (("train", 200), ("test", 40)):
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("\n".join(json.dumps({"prompt": e.prompt, "answer": e.answer})
                                          for e in getattr(task, split)[:n]) + "\n")
    return ["task.type=jsonl", f"task.train_path={paths['train']}", f"task.test_path={paths['test']}",
            "task.reward=exact", f"eval.sets={{held: {{path: {paths['test']}, k: {k}, temperature: {temperature}}}}}"]


def assert_reward_rose(client, run_id: str, window: int = 5, min_gain: float = 0.05) -> None:
    """The student's verifiable reward (math-verify on its own samples) rose: the mean of the last
    `window` steps' `train/reward` is at least `min_gain` above the first `window` steps'."""
    reward = [v for _, v in history(client, run_id, "train/reward")]
    first, last = sum(reward[:window]) / window, sum(reward[-window:]) / window
    assert last >= first + min_gain, f"train/reward {first:.3f} -> {last:.3f} (steps 1-{window} vs the last {window})"
