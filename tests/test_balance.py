"""Balanced plans (`orchestrator/balance.py`), the cost model (`core/cost_model.py`) and its
calibration (`core/calibration.py`), checked without GPUs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from core.calibration import Calibration, fit, measured_times, steady_steps
from core.config import ConfigError, load_config
from core.cost_model import CPU_THREAD, Device, Model, StepCost, Throughput, Workload, decode_seconds, defaults
from core.scales import ClusterSpec
from orchestrator.balance import Layout, balance, candidates
from orchestrator.plan import resolve

ONE_NODE = ClusterSpec(1, 8, "H100", 80)
PAPER = "experiments/paper_1p5b_math.yaml"


def paper_plan(*overrides: str, cluster: ClusterSpec = ONE_NODE):
    return resolve(load_config(PAPER, list(overrides)), PAPER, cluster=cluster)


class HandCosts:
    """Phase times set by hand: rollout 100 / engines, teacher 60 / replicas, learner 40 / ranks (s)."""

    def cost(self, lay: Layout) -> StepCost:
        return StepCost(seconds={"rollout": 100 / lay.rollout, "teacher": 60 / lay.teacher, "learner": 40 / lay.learner},
                        gpus=lay.role_gpus(), colocated=lay.colocated)


def test_search_finds_the_hand_computed_optimum_and_keeps_pinned_counts():
    free = {"rollout": None, "teacher": None, "learner": None, "evaluator": None}
    tps = {"rollout": 1, "teacher": 1, "evaluator": 1}
    every = lambda lay: True  # noqa: E731
    # strict loop, 8 GPUs, minimize time: 100/r + 60/t + 40/l over r + t + l <= 8 -> (3, 3, 2): 33.3 + 20 + 20
    lay, cost = balance(HandCosts(), candidates(free, tps, 8, evaluators=False, max_evaluators=0, colocate="none"),
                        every, every, "time")
    assert (lay.rollout, lay.teacher, lay.learner) == (3, 3, 2) and cost.step_seconds == pytest.approx(100 / 3 + 40)
    # colocated pairs free a GPU per teacher: 100/r + 60/r + 40/l over r + l <= 8 -> (5, 3): 32 + 13.3 beats (6, 2): 26.7 + 20
    lay, _ = balance(HandCosts(), candidates(free, tps, 8, evaluators=False, max_evaluators=0, colocate="auto"),
                     every, every, "time")
    assert (lay.rollout, lay.teacher, lay.learner, lay.colocated) == (5, 5, 3, True) and lay.gpus == 8
    # a pinned count stays; the rest is balanced around it; memory (`fits`) rules layouts out
    pinned = {**free, "learner": 4}
    lay, _ = balance(HandCosts(), candidates(pinned, tps, 8, evaluators=False, max_evaluators=0, colocate="none"),
                     every, every, "time")
    assert lay.learner == 4 and (lay.rollout, lay.teacher) == (2, 2)
    lay, _ = balance(HandCosts(), candidates(free, tps, 8, evaluators=False, max_evaluators=0, colocate="none"),
                     lambda lay: lay.learner >= 3, every, "time")
    assert lay.learner >= 3
    # GPU-time: (r + t + l)(100/r + 60/t + 40/l) >= (10 + sqrt 60 + sqrt 40)^2 = 579.5 at r:t:l = 10:7.7:6.3;
    # within 8 GPUs (3, 2, 2) gives 7 x 83.3 = 583.3, one GPU each 3 x 200 = 600, (3, 3, 2) 8 x 73.3 = 586.7
    lay, cost = balance(HandCosts(), candidates(free, tps, 8, evaluators=False, max_evaluators=0, colocate="none"),
                        every, every, "gpu_time")
    assert (lay.rollout, lay.teacher, lay.learner) == (3, 2, 2)
    assert cost.reserved_devices * cost.step_seconds == pytest.approx(7 * (100 / 3 + 30 + 20))


def test_paper_trial_plans_balanced_within_1p5x_of_busy_pipelined():
    """The EffOPD paper's 1.5B trial on one 8 x H100 node, pipelined at staleness 1."""
    plan = paper_plan("pipeline.max_staleness=1")
    cost = plan.cost
    assert plan.layout_source == "balanced (gpu_time)" and plan.layout.colocated
    assert plan.reserved_gpu_hours <= 1.5 * plan.busy_gpu_hours  # reserved GPU-time <= 1.5 x busy
    registry = plan.registry[1]
    assert registry is not None and registry.busy_share < cost.busy_share  # the registry's row idles more
    # every role's memory holds (resolve raises otherwise) and the colocated engines split their GPU's share
    assert plan.engine_util["rollout"] + plan.engine_util["teacher"] == pytest.approx(0.9, abs=1e-3)
    text = plan.describe()
    assert "| strict" in text and "| staleness 1" in text and "registry: rollout 2, teacher 1, learner 4" in text
    fastest = paper_plan("pipeline.max_staleness=1", "plan.objective=time")
    assert fastest.total_gpus == 8 and fastest.cost.step_seconds < cost.step_seconds
    assert fastest.reserved_gpu_hours <= 1.5 * fastest.busy_gpu_hours


def test_colocated_plan_shares_bundles_and_asks_for_half_a_gpu():
    plan = paper_plan()
    rollout, teacher = plan.role("rollout"), plan.role("teacher")
    assert teacher.host == "rollout" and rollout.share == teacher.share == 0.5
    assert teacher.options()["num_gpus"] == 0.5 and rollout.options()["num_gpus"] == 0.5
    assert plan.first_bundle("teacher") == plan.first_bundle("rollout") == 0
    assert plan.first_bundle("learner") == rollout.actors  # the teacher adds no bundles
    assert len(plan.bundles()) == rollout.actors + plan.role("learner").actors
    assert plan.bundles()[0] == {"CPU": rollout.cpus + teacher.cpus, "GPU": 1.0}
    assert plan.total_gpus == rollout.actors + plan.role("learner").actors
    assert plan.params()["plan/colocated"] == "True" and plan.params()["plan/layout"] == "balanced (gpu_time)"
    apart = paper_plan("plan.colocate=none")
    assert not apart.layout.colocated and apart.role("teacher").host == "" and apart.role("teacher").share == 1.0
    with pytest.raises(ConfigError, match="plan.layout"):
        paper_plan("plan.layout=somewhere")


def test_continuous_batching_decodes_total_tokens_not_the_longest_sequence():
    """vLLM: I = max(R, g / c) iterations; HF generate: R iterations over the whole static batch."""
    model, device = Model(1e9, 2, 1e5), Device(1e15, 1e12)
    thr = Throughput(decode_bw=1.0, prefill_mfu=1.0)
    work = Workload(sequences=64, prompt_len=100, response_len=1000, fill=0.5)
    g, ctx = 64 * 500, 100 + 2 / 3 * 500
    vllm = decode_seconds(model, device, thr, 1, 1, work, "vllm")
    assert vllm == pytest.approx((1000 * 2e9 + g * ctx * 1e5) / 1e12)
    hf = decode_seconds(model, device, thr, 1, 1, work, "hf")
    assert hf == pytest.approx(1000 * (2e9 + 64 * (100 + 500) * 1e5) / 1e12)
    # a KV cache for 16 sequences at a time: 64 x 500 tokens take 2000 iterations, weights read each time
    small = decode_seconds(model, device, thr, 1, 1, work, "vllm", kv_tokens=16 * 600)
    assert small == pytest.approx((2000 * 2e9 + g * ctx * 1e5) / 1e12)


def test_fit_recovers_the_constants_a_run_was_made_with():
    """Synthetic 'measurements' from known constants: the fit gives them back (each role t = L + A / c)."""
    model = Model(1e6, 4, 1e3)
    truth = replace(defaults("cpu"), decode_bw=0.04, prefill_mfu=0.3, train_mfu=0.2, sync_bytes_per_s=1e8)
    work = Workload(64, 40, 12, 0.7)

    def seconds(thr: Throughput) -> dict[str, float]:
        from core.cost_model import learner_seconds, prefill_seconds, sync_seconds

        return {"rollout": decode_seconds(model, CPU_THREAD, thr, 1, 1, work, "hf"),
                "teacher": prefill_seconds(model, CPU_THREAD, thr, 1, 1, work.tokens),
                "learner": learner_seconds(model, CPU_THREAD, thr, 2, work.tokens, checkpointing=False),
                "sync": sync_seconds(model, thr)}

    measured = {**seconds(truth), "driver": 0.03, "step": 1.0}
    got, notes = fit(seconds, defaults("cpu"), measured)
    for name in ("decode_bw", "prefill_mfu", "train_mfu", "sync_bytes_per_s"):
        assert getattr(got, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    assert got.latency_step == 0.03 and not notes
    # a role measured at or below its latency keeps its default and says so
    _, notes = fit(seconds, defaults("cpu"), {**measured, "sync": 0.001})
    assert any(n.startswith("sync:") and "kept" in n for n in notes)


def test_steady_steps_and_medians_skip_warm_up_evaluation_and_search():
    steps = range(1, 9)
    history = {m: {s: float(s) for s in steps} for m in ("timing/rollout_busy", "timing/teacher_busy",
                                                          "timing/learner_busy", "timing/sync", "timing/step")}
    history["timing/critical_path"] = {s: s - 0.5 for s in steps}
    history["timing/eval"] = {4: 1.0, 8: 1.0}
    history["timing/search"] = {2: 1.0}
    got = steady_steps(history)
    assert got == [3, 5, 6, 7]
    m = measured_times(history, got)
    assert m["rollout"] == 5.5 and m["driver"] == 0.5


def test_calibration_file_round_trips_and_a_wrong_device_is_refused(tmp_path):
    cal = Calibration(replace(defaults("cpu"), train_mfu=0.5, source="measured: x"), 0.7, 37.0, "x", "cpu", 6, {"step": 1.0})
    path = cal.save(tmp_path / "calibration.json")
    assert Calibration.load(tmp_path) == cal == Calibration.load(path)
    with pytest.raises(ConfigError, match="was measured on cpu; this plan runs on H100"):
        paper_plan(f"plan.calibration={path}")
    with pytest.raises(ConfigError, match="plan.calibration: .*not a calibration"):
        paper_plan(f"plan.calibration={tmp_path / 'missing.json'}")
    assert math.isfinite(paper_plan().cost.step_seconds)


def test_calibrate_refuses_what_is_not_a_run_with_the_reason(tmp_path):
    from orchestrator.calibrate import calibrate

    with pytest.raises(ConfigError, match="--calibrate: .* is neither a run folder"):
        calibrate(tmp_path / "nothing")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "mlflow_run_id").write_text("0" * 32)
    with pytest.raises(ConfigError, match="is not in sqlite:///"):
        calibrate(tmp_path / "run")
