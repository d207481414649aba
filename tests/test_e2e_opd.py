"""End to end on real components: `foresight prepare`, then OPD on local Ray with a DeepSpeed
ZeRO-3 learner (2 ranks, gloo), HF rollout and teacher actors, and a real MLflow store.

The reference run is experiments/smoke.yaml. The resume and restart tests kill processes
mid-run and require the final metrics to equal the reference's (same seed; CPU determinism).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TEST_ENV, foresight, run_overrides

pytestmark = pytest.mark.e2e
SMOKE = str(ROOT / "experiments" / "smoke.yaml")


def mlflow_run(out: Path, name: str = "smoke"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name]
    return client, runs


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    t0 = time.time()
    proc = foresight("run", SMOKE, *run_overrides(models, out))
    client, runs = mlflow_run(out)
    return {"out": out, "client": client, "run": runs[0], "runs": runs, "seconds": time.time() - t0, "proc": proc}


def test_prepare_builds_teacher_and_student(models):
    meta = json.loads((models / "prepare.json").read_text())
    assert meta["teacher"]["test_accuracy"] >= 0.95
    assert 0.30 <= meta["student"]["test_accuracy"] <= 0.60
    assert meta["teacher"]["params"] > meta["student"]["params"]
    for role in ("teacher", "student"):
        assert (models / role / "model.safetensors").is_file() and (models / role / "tokenizer.json").is_file()


def test_smoke_run_improves_student_and_logs_to_mlflow(reference):
    client, run = reference["client"], reference["run"]
    assert len(reference["runs"]) == 1 and run.info.status == "FINISHED"
    acc = history(client, run.info.run_id, "eval/accuracy")
    assert acc[0][0] == 0 and acc[-1][0] == 80
    assert_student_learned(client, run.info.run_id)
    for key in ("train/loss", "train/reverse_kl", "timing/rollout", "timing/teacher", "timing/learner",
                "timing/sync", "timing/step"):
        steps = [s for s, _ in history(client, run.info.run_id, key)]
        assert steps == list(range(1, 81)), key
    geo = history(client, run.info.run_id, "geometry/stable_rank")
    assert [s for s, _ in geo] == [20, 40, 60, 80] and all(v >= 1.0 for _, v in geo)
    lock_in = history(client, run.info.run_id, "geometry/sim_to_final")
    assert [s for s, _ in lock_in] == [20, 40, 60, 80] and abs(lock_in[-1][1] - 1.0) < 1e-9
    assert all(0.0 <= v <= 1.0 + 1e-9 for _, v in lock_in)
    assert history(client, run.info.run_id, "geometry/update_norm/mlp")[-1][1] > 0
    assert run.data.tags["method"] == "vanilla" and run.data.tags["seed"] == "0" and run.data.tags["scale"] == "tiny"
    assert run.data.params["learner/world_size"] == "2"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"resolved_config.yaml", "final_checkpoint.txt"} <= arts
    assert (reference["out"] / "smoke" / "final" / "model.safetensors").is_file()
    print(f"smoke run wall time {reference['seconds']:.0f}s; accuracy {acc[0][1]:.3f} -> {acc[-1][1]:.3f}")


def assert_student_learned(client, run_id: str) -> None:
    """The student moved toward the teacher: reverse KL down by a fifth, test accuracy up."""
    kl = [v for _, v in history(client, run_id, "train/reverse_kl")]
    acc = history(client, run_id, "eval/accuracy")
    assert sum(kl[-10:]) <= 0.8 * sum(kl[:10]), f"reverse KL {sum(kl[:10]) / 10:.3f} -> {sum(kl[-10:]) / 10:.3f}"
    assert acc[-1][1] - acc[0][1] >= 0.05, f"accuracy went {acc[0][1]:.3f} -> {acc[-1][1]:.3f}"


def start_run(models: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "run", SMOKE, *run_overrides(models, out), *extra],
                            cwd=ROOT, env={**os.environ, **TEST_ENV}, start_new_session=True,
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


def latest(out: Path) -> str:
    p = out / "smoke" / "checkpoints" / "latest"
    return p.read_text().strip() if p.is_file() else ""


def assert_same_metrics(client, run_id: str, reference) -> None:
    ref_client, ref_id = reference["client"], reference["run"].info.run_id
    for key in ("train/loss", "train/reverse_kl", "train/reward", "eval/accuracy"):
        got, want = history(client, run_id, key), history(ref_client, ref_id, key)
        assert [s for s, _ in got] == [s for s, _ in want], f"{key}: steps differ (duplicates or gaps)"
        for (s, a), (_, b) in zip(got, want):
            assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), f"{key} at step {s}: {a} != {b}"


def test_sigkill_driver_then_resume_matches_uninterrupted_run(models, tmp_path, reference):
    proc = start_run(models, tmp_path)
    wait_for(lambda: latest(tmp_path) == "step0000040", proc)
    time.sleep(1.0)  # a few steps past the checkpoint, so some are logged twice unless deduplicated
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and every actor
    proc.wait()
    resumed = foresight("run", SMOKE, *run_overrides(models, tmp_path))
    assert "resuming from step0000040" in resumed.stderr
    client, runs = mlflow_run(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert_same_metrics(client, runs[0].info.run_id, reference)


def test_killed_rollout_and_teacher_actors_are_restarted(models, tmp_path, reference):
    proc = start_run(models, tmp_path)
    pids = tmp_path / "smoke" / "actors"
    killed = {}
    for role, at in (("rollout-0", "step0000020"), ("teacher-0", "step0000040")):
        wait_for(lambda: latest(tmp_path) == at, proc)
        killed[role] = int((pids / f"{role}.pid").read_text())
        os.kill(killed[role], signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    for role, pid in killed.items():  # Ray started a new process for each killed actor
        assert int((pids / f"{role}.pid").read_text()) != pid, role
    client, runs = mlflow_run(tmp_path)
    assert len(runs) == 1
    assert_same_metrics(client, runs[0].info.run_id, reference)
