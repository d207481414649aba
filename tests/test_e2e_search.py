"""An Optuna search on Ray Tune (local Ray) whose trials are MLflow child runs: ASHA stops a bad trial
at its first evaluation, and a re-run with a larger n_trials resumes the study.
(Matrix sweeps on Tune: concurrency, a killed trial retried, a stopped driver restored, re-run skips,
are in test_e2e_sweep.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import foresight, run_overrides

pytestmark = pytest.mark.e2e
STUDY = """
sweep: study
base:
  run: {steps: 4}
  learner: {world_size: 1}
  rollout: {batch_prompts: 32, max_new_tokens: 6}
  eval: {every: 2, num_examples: 50}
  checkpoint: {every: 0}
search:
  params:
    learner.lr: {type: float, low: 1.0e-5, high: 1.0, log: true}
  points: [{learner.lr: 1.0e-5}, {learner.lr: 1.0}]
  objective: final_accuracy
  n_trials: 2
  sampler: random
  pruner: asha
scheduler: {max_concurrent: 1}
"""
"""Trial 0 (lr 1e-5) keeps the student's accuracy; trial 1 (lr 1.0) wrecks it in two Adam steps.
One trial at a time, so trial 1 meets ASHA's rung at step 2 after trial 0 has recorded there."""
RESUMED = STUDY.replace("n_trials: 2", "n_trials: 3")


def children(out: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return client, {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId")}


def test_asha_search_stops_the_bad_trial_and_a_rerun_resumes_the_study(models, tmp_path):
    import optuna

    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    first = foresight("run", str(path), *run_overrides(models, tmp_path))
    assert "stopped early: study_t001 at step 2" in first.stdout, first.stdout[-3000:]
    assert "0 trials done, 2 to run" in first.stderr
    assert "done: study_t000 final test accuracy" in first.stdout
    client, runs = children(tmp_path, "study")
    good, bad = runs["study_t000"], runs["study_t001"]
    assert good.info.status == "FINISHED" and bad.info.status == "KILLED"
    assert bad.data.tags["pruned"] == "true" and bad.data.tags["pruned_at_step"] == "2"
    assert [m.step for m in client.get_metric_history(bad.info.run_id, "train/loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(good.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert bad.data.metrics["eval/accuracy"] < good.data.metrics["eval/accuracy"]
    assert (tmp_path / "tune" / "study").is_dir()  # Tune's own result files stay under the run directory

    path.write_text(RESUMED)
    second = foresight("run", str(path), *run_overrides(models, tmp_path))
    assert "2 trials done, 1 to run" in second.stderr
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path / 'study.optuna.db'}")
    states = {t.number: t.state for t in study.trials}
    assert len(states) == 3 and all(s.is_finished() for s in states.values())
    assert states[0] == optuna.trial.TrialState.COMPLETE and states[1] == optuna.trial.TrialState.PRUNED
    assert study.trials[2].params not in (study.trials[0].params, study.trials[1].params)  # sampled, not a point
    _, runs = children(tmp_path, "study")
    assert {r.data.tags["optuna.trial"] for r in runs.values()} == {"0", "1", "2"}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {study_parent(tmp_path)}


def study_parent(out: Path) -> str:
    return (out / "study.parent_run_id").read_text().strip()
