"""End to end on real components: `foresight prepare`, then OPD on local Ray with a DeepSpeed
ZeRO-3 learner (2 ranks, gloo), HF rollout and teacher actors, and a real MLflow store.

The reference run is experiments/smoke.yaml (the session fixture `smoke_reference`). Crash and
restart behaviour (killed actors, a SIGKILLed driver, resume) is tested once, on an EffOPD run, in
test_e2e_effopd.py.
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, SMOKE_PIPELINED, foresight, run_overrides
from e2e_helpers import assert_student_learned, history

pytestmark = pytest.mark.e2e


def test_shipped_models_are_what_their_recipe_record_says(models):
    """models/addition holds the default recipe's result: the files hash to the record's sha256 and
    score the record's exact test accuracies (teacher >= 0.95, student in its band)."""
    from core.config import AdditionTask
    from core.modeling import greedy_accuracy, load_model, load_tokenizer
    from orchestrator.prepare import RECIPES, sha256
    from core.task import build_task

    meta = json.loads((models / "prepare.json").read_text())
    assert meta["recipe"] == json.loads(json.dumps(RECIPES["default"].__dict__))
    task = build_task(AdditionTask())
    for role in ("teacher", "student"):
        assert sha256(models / role / "model.safetensors") == meta[role]["sha256"], role
        acc = greedy_accuracy(load_model(models / role), load_tokenizer(models / role), task.test, task.rewards, 5)
        assert acc == meta[role]["test_accuracy"], role
    assert meta["teacher"]["test_accuracy"] >= 0.95
    lo, hi = meta["recipe"]["student_band"]
    assert lo - 0.05 <= meta["student"]["test_accuracy"] <= hi + 0.05  # the band holds on the stopping subset
    assert meta["teacher"]["params"] > meta["student"]["params"]


def test_prepare_is_deterministic(tmp_path):
    """The same recipe and seed build bit-identical weights (checked on the quick recipe; the
    default recipe's checksums are in models/addition/prepare.json)."""
    for out in ("a", "b"):
        foresight("prepare", "--out", str(tmp_path / out), "--recipe", "quick")
    a, b = (json.loads((tmp_path / out / "prepare.json").read_text()) for out in ("a", "b"))
    for role in ("teacher", "student"):
        assert a[role]["sha256"] == b[role]["sha256"], role


def test_smoke_run_improves_student_and_logs_to_mlflow(smoke_reference):
    client, run = smoke_reference["client"], smoke_reference["run"]
    assert len(smoke_reference["runs"]) == 1 and run.info.status == "FINISHED"
    acc = history(client, run.info.run_id, "eval/accuracy")
    assert acc[0][0] == 0 and acc[-1][0] == 80
    assert_student_learned(client, run.info.run_id)
    for key in ("train/loss", "train/reverse_kl", "timing/rollout", "timing/teacher", "timing/learner",
                "timing/sync", "timing/step", "timing/rollout_busy", "timing/teacher_busy", "timing/learner_busy",
                "timing/critical_path", "util/rollout", "util/teacher", "util/learner", "pipeline/staleness"):
        steps = [s for s, _ in history(client, run.info.run_id, key)]
        assert steps == list(range(1, 81)), key
    geo = history(client, run.info.run_id, "geometry/stable_rank")
    assert [s for s, _ in geo] == [20, 40, 60, 80] and all(v >= 1.0 for _, v in geo)
    lock_in = history(client, run.info.run_id, "geometry/sim_to_final")
    assert [s for s, _ in lock_in] == [20, 40, 60, 80] and abs(lock_in[-1][1] - 1.0) < 1e-9
    assert all(0.0 <= v <= 1.0 + 1e-9 for _, v in lock_in)
    assert history(client, run.info.run_id, "geometry/update_norm/mlp")[-1][1] > 0
    assert run.data.tags["method"] == "vanilla" and run.data.tags["seed"] == "0" and run.data.tags["scale"] == "tiny"
    assert run.data.params["plan/learner/actors"] == "2"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"resolved_config.yaml", "final_checkpoint.txt"} <= arts
    assert (smoke_reference["out"] / "smoke" / "final" / "model.safetensors").is_file()
    print(f"smoke run wall time {smoke_reference['seconds']:.0f}s; accuracy {acc[0][1]:.3f} -> {acc[-1][1]:.3f}")


def test_plan_calibrates_from_the_smoke_run_and_predicts_its_step(smoke_reference, models):
    """`foresight plan --calibrate RUN_DIR`: the constants fitted to the run's busy times, written beside
    it, and the plan of the same config (pipelined, staleness 1) predicting its measured step within
    25% (the per-role fits composed through the pipeline's step model; evaluation left out on both
    sides). Another config predicted from a calibration: benchmarks/plan_calibration.py."""
    import statistics

    from core.calibration import Calibration, steady_steps
    from core.config import load_config
    from orchestrator.plan import resolve

    out, client, run = smoke_reference["out"], smoke_reference["client"], smoke_reference["run"]
    args = [*run_overrides(models, out), *SMOKE_PIPELINED]
    proc = foresight("plan", str(ROOT / "experiments" / "smoke.yaml"), *args, "--calibrate", str(out / "smoke"), "--brief")
    assert f"cost model: measured: {out / 'smoke'}" in proc.stdout and "pipelined, staleness 1" in proc.stdout
    cal = Calibration.load(out / "smoke")
    assert cal.device == "cpu" and cal.steps > 50 and 0 < cal.fill <= 1
    from orchestrator.calibrate import calibrate

    by_id = calibrate(run.info.run_id, f"sqlite:///{out / 'mlflow.db'}")  # the MLflow run id, its store named
    assert by_id[0] == out / "smoke" / "calibration.json" and by_id[1].throughput.train_mfu == pytest.approx(
        cal.throughput.train_mfu)
    assert all(getattr(cal.throughput, k) > 0 for k in ("decode_bw", "prefill_mfu", "train_mfu", "sync_bytes_per_s"))
    plan = resolve(load_config(ROOT / "experiments" / "smoke.yaml", [*args, f"plan.calibration={out / 'smoke'}"]), "smoke")
    s = plan.cost.seconds
    predicted = plan.cost.step_seconds - sum(s.get(k, 0.0) for k in ("eval", "eval_sets", "search"))
    keys = ("timing/step", "timing/rollout_busy", "timing/teacher_busy", "timing/learner_busy", "timing/sync",
            "timing/eval", "timing/search")
    hist = {k: dict(history(client, run.info.run_id, k)) for k in keys}
    measured = statistics.mean(hist["timing/step"][step] for step in steady_steps(hist))
    assert abs(predicted / measured - 1) <= 0.25, (predicted, measured, s)


def test_pipelined_run_keeps_its_staleness_bound_and_resumes_exactly(smoke_reference, models, tmp_path):
    """The smoke reference runs with pipeline.max_staleness=1 (and learned: the test above). Every
    batch was sampled by weights at most one learner step old (the versions the rollout workers
    report), the pipeline ran ahead wherever it may and drained after each evaluation/checkpoint
    (steps 20, 40, 60). Resume: the run folder as a crash after the step-60 checkpoint leaves it
    (`latest` -> step 60, no final weights), re-run with the same command, ends with final weights
    bit-identical to the uninterrupted run's."""
    import shutil

    from conftest import SMOKE_PIPELINED, run_overrides

    client, run = smoke_reference["client"], smoke_reference["run"]
    staleness = dict(history(client, run.info.run_id, "pipeline/staleness"))
    assert sorted(staleness) == list(range(1, 81)) and set(staleness.values()) == {0.0, 1.0}
    assert all(staleness[s] == 0.0 for s in (1, 21, 41, 61)), "the pipeline must drain at evaluations/checkpoints"
    assert sum(staleness.values()) == 80 - 4  # every other step's batch was sampled while the learner trained
    util = history(client, run.info.run_id, "util/learner")
    assert all(0.0 < v <= 1.0 for _, v in util)

    src, out = smoke_reference["out"], tmp_path
    shutil.copytree(src / "smoke", out / "smoke")
    shutil.copy(src / "mlflow.db", out / "mlflow.db")
    ckpts = out / "smoke" / "checkpoints"
    assert (ckpts / "step0000060").is_dir()
    (ckpts / "latest").write_text("step0000060")
    shutil.rmtree(ckpts / "step0000080")
    shutil.rmtree(out / "smoke" / "final")
    (out / "smoke" / "done.json").unlink()
    resumed = foresight("run", str(ROOT / "experiments" / "smoke.yaml"), *run_overrides(models, out), *SMOKE_PIPELINED)
    assert "step0000060" in resumed.stdout + resumed.stderr
    final = "smoke/final/model.safetensors"
    assert (out / final).read_bytes() == (src / final).read_bytes(), "the resumed pipelined run diverged"


def test_pg_reverse_kl_and_exopd_as_published(method_sweep):
    """The papers' loss (sampled-token reverse-KL policy gradient) end to end, and ExOPD (reward
    extrapolation relative to the frozen initial student) on it, from the session's method sweep:
    vanilla learns; ExOPD at lam = 1.25 gives different final weights (the reference's log-probs
    enter the advantage) and learns. (At lam = 1 ExOPD is vanilla's step exactly: the reference is
    never scored and the loss spec is vanilla's, tests/test_config.py.)"""
    import torch
    from safetensors.torch import load_file

    from e2e_helpers import mlflow_run

    out = method_sweep["out"]
    final = {n: load_file(str(out / f"dash_{n}" / "final" / "model.safetensors"))
             for n in ("vanilla_s0", "exopd_lam125")}
    assert any(not torch.equal(final["exopd_lam125"][k], final["vanilla_s0"][k]) for k in final["vanilla_s0"])
    # The sampled-token gradient on 64 prompts x 6 tokens is noisy (per-step reverse-KL sd ~0.22 around
    # its trend) and lr 1e-4 is the largest it stands (3e-4 loses accuracy): judge learning on windows.
    # Measured (this machine and CI alike): vanilla seeds 0+1 KL 2.372 -> 2.171 (-8.5%), accuracy 0.31 ->
    # 0.355 (mean of the evaluations at 20, 40, 60); ExOPD lam 1.25 KL 2.305 -> 2.192 (-4.9%), 0.31 -> 0.39.
    vanilla = [mlflow_run(out, f"dash_vanilla_s{seed}", experiment="dash") for seed in (0, 1)]
    exopd = [mlflow_run(out, "dash_exopd_lam125", experiment="dash")]
    for runs in (vanilla, exopd):
        assert all(r[0].data.params["loss/type"] == "pg_reverse_kl" for _, r in runs)
    assert_learned_on_average(vanilla, kl_drop=0.05, min_gain=0.03)
    assert_learned_on_average(exopd, kl_drop=0.025, min_gain=0.04)
    # the sweep on one shared teacher pool: one teacher process scored all five trials (ExOPD's reference
    # is scored in the same HF actor), the pool stopped once when its last trial ended
    pooled = [mlflow_run(out, f"dash_{n}", experiment="dash")[1][0]
              for n in ("vanilla_s0", "vanilla_s1", "effopd_s0", "effopd_s1", "exopd_lam125")]
    assert len({r.data.tags["teacher/pool"] for r in pooled}) == 1 and len({r.data.tags["teacher/pids"] for r in pooled}) == 1
    assert method_sweep["run"].stdout.count("teacher pool dash-teacher-") == 1
    assert not list(out.glob("dash_*/actors/teacher-*.pid")) and len(list(out.glob("teacher_pools/*/actors/teacher-0.pid"))) == 1


def assert_learned_on_average(runs: list, kl_drop: float, min_gain: float) -> None:
    """Over the given runs: mean reverse KL of the last 10 steps <= (1 - kl_drop) x that of the first 10,
    and mean test accuracy after step 0 >= the step-0 accuracy + min_gain."""
    first = last = acc0 = later = 0.0
    for client, r in runs:
        kl = [v for _, v in history(client, r[0].info.run_id, "train/reverse_kl")]
        acc = [v for _, v in history(client, r[0].info.run_id, "eval/accuracy")]
        first, last = first + sum(kl[:10]) / 10, last + sum(kl[-10:]) / 10
        acc0, later = acc0 + acc[0], later + sum(acc[1:]) / len(acc[1:])
    n = len(runs)
    assert last <= (1 - kl_drop) * first, f"reverse KL {first / n:.3f} -> {last / n:.3f}"
    assert later - acc0 >= min_gain * n, f"accuracy {acc0 / n:.3f} -> {later / n:.3f} (mean after step 0)"
