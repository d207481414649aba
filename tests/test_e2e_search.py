"""An Optuna study on local Ray whose trials are MLflow child runs, resumed by a re-run. (The
matrix-sweep scheduler: concurrency, a killed trial retried, re-run skips, is in test_e2e_sweep.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import foresight, run_overrides

pytestmark = pytest.mark.e2e


def children(out: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, [r for r in runs if r.data.tags.get("mlflow.parentRunId")]


def test_optuna_study_trials_are_child_runs_and_resume(models, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("""
sweep: study
base:
  run: {steps: 4}
  learner: {world_size: 1}
  rollout: {batch_prompts: 32, max_new_tokens: 6}
  eval: {every: 2, num_examples: 50}
  checkpoint: {every: 0}
search:
  params:
    learner.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
  objective: final_accuracy
  n_trials: 1
  sampler: random
""")
    first = foresight("run", str(path), *run_overrides(models, tmp_path))
    assert first.stdout.count("trial ") >= 1
    path.write_text(path.read_text().replace("n_trials: 1", "n_trials: 2"))
    second = foresight("run", str(path), *run_overrides(models, tmp_path))
    assert "1 trials done, 1 to run" in second.stderr
    import optuna

    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path / 'study.optuna.db'}")
    assert len([t for t in study.trials if t.state.is_finished()]) == 2
    _, runs = children(tmp_path, "study")
    assert len(runs) == 2 and {r.data.tags["optuna.trial"] for r in runs} == {"0", "1"}
