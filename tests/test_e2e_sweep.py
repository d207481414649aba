"""A sweep end to end: the geometry study's training controls (OPD, SFT on teacher outputs,
GRPO, OPD/RLVR mix, top-KL token sparsification, rank-16 gradient projection for OPD and SFT)
as MLflow child runs of one parent; a re-run skips finished trials."""

from __future__ import annotations

import pytest

from conftest import ROOT, foresight, run_overrides

pytestmark = pytest.mark.e2e
STUDY = str(ROOT / "experiments" / "geometry_study.yaml")
SHORT = ["run.steps=6", "eval.every=3", "geometry.every=3", "checkpoint.every=0", "eval.num_examples=100"]


def test_geometry_study_sweep_runs_every_control(models, tmp_path):
    out = foresight("run", STUDY, *run_overrides(models, tmp_path), *SHORT)
    assert out.stdout.count("done:") == 7
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("geometry_study")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_name == "geometry_study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parent) == 1 and len(children) == 7
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent[0].info.run_id}
    for r in children:
        assert r.info.status == "FINISHED", r.info.run_name
        assert "geometry/stable_rank" in r.data.metrics and "train/loss" in r.data.metrics
    projected = next(r for r in children if r.info.run_name.endswith("_opd_rank16"))
    assert projected.data.params["learner/grad_project_rank"] == "16"
    assert (tmp_path / "geometry_study_opd_rank16" / "projection_basis.pt").is_file()
    sft = next(r for r in children if r.info.run_name.endswith("_sft"))
    assert sft.data.params["rollout/source"] == "teacher" and sft.data.params["loss/type"] == "sft"
    assert sft.data.metrics["train/reward"] > 0.8  # the teacher's own samples are mostly right
    again = foresight("run", STUDY, *run_overrides(models, tmp_path), *SHORT)
    assert again.stdout.count("already finished") == 7
