"""The scheduler on local Ray: a 4-trial tiny sweep with two trials at a time, a trial whose
runner is killed mid-run is retried (resuming into the same MLflow run), a re-run skips
finished trials; and an Optuna study whose trials are MLflow child runs, resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, TEST_ENV, foresight, run_overrides
from test_e2e_opd import wait_for

pytestmark = pytest.mark.e2e


def sweep_file(tmp_path: Path) -> Path:
    path = tmp_path / "four.yaml"
    path.write_text("""
sweep: four
scheduler:
  max_retries: 2
base:
  run: {steps: 24}
  learner: {world_size: 1, lr: 2.0e-4}
  loss: {type: full_reverse_kl}
  rollout: {batch_prompts: 32, max_new_tokens: 6}
  eval: {every: 12, num_examples: 100}
  checkpoint: {every: 6}
matrix:
  run.seed: [0, 1]
  method.type: [vanilla, exopd]
""")
    return path


def children(out: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, [r for r in runs if r.data.tags.get("mlflow.parentRunId")]


def test_sweep_runs_concurrently_retries_a_killed_trial_and_skips_finished(models, tmp_path):
    path = sweep_file(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "run", str(path), *run_overrides(models, tmp_path)],
                            cwd=ROOT, env={**os.environ, **TEST_ENV}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = tmp_path / "four_s0_vanilla"
    wait_for(lambda: (victim / "checkpoints" / "latest").is_file() and (victim / "actors" / "trial-0.pid").is_file(), proc)
    os.kill(int((victim / "actors" / "trial-0.pid").read_text()), signal.SIGKILL)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-5000:]
    assert "2 running" in out  # two trials ran at the same time
    assert "retrying from its last checkpoint" in out
    client, runs = children(tmp_path, "four")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    killed = next(r for r in runs if r.info.run_name == "four_s0_vanilla")
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "train/loss")]
    assert steps == list(range(1, 25))  # resumed into the same run, no duplicates
    again = foresight("run", str(path), *run_overrides(models, tmp_path))
    assert again.stdout.count("already finished") == 4 or again.stderr.count("already finished") == 4


def test_optuna_study_trials_are_child_runs_and_resume(models, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("""
sweep: study
base:
  run: {steps: 8}
  learner: {world_size: 1}
  rollout: {batch_prompts: 32, max_new_tokens: 6}
  eval: {every: 4, num_examples: 100}
  checkpoint: {every: 0}
search:
  params:
    learner.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
  objective: final_accuracy
  n_trials: 3
  sampler: random
""")
    first = foresight("run", str(path), *run_overrides(models, tmp_path))
    assert first.stdout.count("trial ") >= 3
    path.write_text(path.read_text().replace("n_trials: 3", "n_trials: 4"))
    second = foresight("run", str(path), *run_overrides(models, tmp_path))
    assert "3 trials done, 1 to run" in second.stderr
    import optuna

    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path / 'study.optuna.db'}")
    assert len([t for t in study.trials if t.state.is_finished()]) == 4
    _, runs = children(tmp_path, "study")
    assert len(runs) == 4 and {r.data.tags["optuna.trial"] for r in runs} == {"0", "1", "2", "3"}
