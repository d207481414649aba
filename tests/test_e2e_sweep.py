"""A sweep end to end on Ray Tune: the shipped geometry study (OPD, SFT on teacher outputs, GRPO,
OPD/RLVR mix, top-KL token sparsification, rank-16 gradient projection for OPD and SFT), 7 trials two
at a time, as MLflow child runs of one parent. One trial's runner (its Tune trainable) is SIGKILLed
mid-run and retried by Tune from its checkpoint into the same MLflow run; then the driver gets
SIGTERM (what `ray job stop` sends) with trials running: it stops, and the same command restores
the Tune experiment (finished trials are not run again, interrupted ones resume from their
checkpoints). Every trial logs each step once. The on-policy trials score on one shared teacher
pool (`teacher.shared=true`): one teacher process for all of them per driver, none in their own
folders, the killed trial retried against the same pool, and the pool stopped when the sweep ends
or is stopped; the off-policy SFT trials keep their own teachers. (A re-run of a finished sweep
launches nothing: test_trial.py.)"""

from __future__ import annotations

import os
import signal

import pytest

from conftest import ROOT, foresight, run_overrides
from e2e_helpers import start_run, wait_for

pytestmark = pytest.mark.e2e
STUDY = str(ROOT / "experiments" / "geometry_study.yaml")
SHORT = ["run.steps=8", "eval.every=4", "geometry.every=4", "checkpoint.every=4", "eval.num_examples=100",
         "learner.world_size=1", "teacher.shared=true"]
"""One learner rank per trial: 1 CPU each, so two trials run at once on 2 CPUs."""


def test_geometry_study_sweep_on_tune_survives_a_killed_trial_and_a_stopped_driver(models, tmp_path):
    proc = start_run(models, tmp_path, *SHORT, config=STUDY)
    victim = tmp_path / "geometry_study_opd"
    pid_file = victim / "actors" / "trial-0.pid"
    wait_for(lambda: (victim / "checkpoints" / "latest").is_file() and pid_file.is_file(), proc, timeout=600)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    wait_for(lambda: len(list(tmp_path.glob("geometry_study_*/done.json"))) >= 2, proc, timeout=600)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "interrupted; resume with the same command" in out, out[-5000:]
    # two trials at the same time: both placement groups held (the pooled OPD trial's 0.75 CPUs and the SFT
    # trial's 1.0 with its own teacher), or both past their set-up
    assert "Logical resource usage: 1.75/2 CPUs" in out or "2 running" in out
    assert "retrying from its last checkpoint" in out
    resumed = foresight("run", STUDY, *run_overrides(models, tmp_path), *SHORT)
    assert "restoring the Tune experiment" in resumed.stderr
    before, after = ({line.split()[1] for line in text.splitlines() if line.startswith("done: ")}
                     for text in (out, resumed.stdout))
    assert len(before) >= 2 and not before & after and len(before | after) == 7  # finished trials not run again
    assert all(f"{name}: already finished, skipped" in resumed.stdout for name in before)

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
    for r in children:  # the killed and the interrupted trials resumed into their runs: no step twice
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")] == list(range(1, 9)), r.info.run_name
    projected = next(r for r in children if r.info.run_name.endswith("_opd_rank16"))
    assert projected.data.params["learner/grad_project_rank"] == "16"
    assert (tmp_path / "geometry_study_opd_rank16" / "projection_basis.pt").is_file()
    sft = next(r for r in children if r.info.run_name.endswith("_sft"))
    assert sft.data.params["rollout/source"] == "teacher" and sft.data.params["loss/type"] == "sft"
    assert sft.data.metrics["train/reward"] > 0.8  # the teacher's own samples are mostly right

    own = {r.info.run_name for r in children if r.data.params["rollout/source"] == "teacher"}
    pooled = [r for r in children if r.info.run_name not in own]
    assert len(own) == 2 and len(pooled) == 5 and not any("teacher/pool" in r.data.tags for r in children if r.info.run_name in own)
    pool, = {r.data.tags["teacher/pool"] for r in pooled}
    assert all(r.data.params["plan/teacher/pool"] == pool for r in pooled)
    assert len({r.data.tags["teacher/pids"] for r in pooled}) <= 2  # one teacher process per driver (first, restored)
    assert (tmp_path / "teacher_pools" / pool / "actors" / "teacher-0.pid").is_file()
    for r in children:  # a pooled trial starts no teacher of its own
        assert (tmp_path / r.info.run_name / "actors" / "teacher-0.pid").is_file() == (r.info.run_name in own)
    assert f"teacher pool {pool} stopped" in out and f"teacher pool {pool} stopped" in resumed.stdout
