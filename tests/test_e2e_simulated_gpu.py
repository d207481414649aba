"""GPU scales on a *simulated* GPU Ray cluster: Ray declares GPUs on this CPU machine, every GPU
actor gets the CUDA_VISIBLE_DEVICES Ray assigned it, and compute falls back to CPU (torch sees no
CUDA device; the learner and vLLM engines log it). Tiny models stand in for 1.5B-32B.

1. One node with 8 declared GPUs: the 1.5B plan the planner balances around 2 pinned learner ranks
   and 2 pinned rollout workers (it colocates a teacher scorer on each rollout worker's GPU) runs end to end as planned
   (actors == plan, one GPU each but for the colocated pairs, learner rendezvous on loopback),
   learns, and nothing it opens listens beyond 127.0.0.1.
2. Four nodes with 8 declared GPUs each (`ray.cluster_utils.Cluster`): the 1.5B EffOPD plan and the
   32B plan are placed as planned (placement probes stand in for actors whose models cannot load
   here; the 1.5B plan as `foresight plan --probe` places it, the 32B plan inside a one-trial Ray
   Tune sweep whose placement group Tune reserved, as `foresight run` of a sweep does): a TP engine's
   GPUs on one node, learner ranks spread over nodes agreeing on master address, world size and
   ranks, NCCL rank offsets at TP 2 and 4 disjoint.
"""

from __future__ import annotations

import os

import pytest
import ray

from conftest import ROOT, run_overrides
from listeners import is_loopback, listeners, tree
from core.config import load_config
from orchestrator.placement import learner_env, nccl_layout, probe_placements
from core.scales import ClusterSpec
from orchestrator.plan import resolve
from orchestrator.teacher_pool import assign_pools, stop
from orchestrator.trainer import OPDTrainer

pytestmark = pytest.mark.e2e
SMOKE = ROOT / "experiments" / "smoke.yaml"


def check_matches_plan(plan, placements: dict[str, list[dict]]) -> None:
    """Every role has the planned actors, each holds exactly its planned GPUs, none shares one except a
    colocated role's actor i, which holds exactly the GPUs of its host role's actor i (a shared
    teacher pool's replicas hold GPUs of their own, outside the trial's reservation)."""
    seen: dict[tuple[str, str], str] = {}
    for spec in sorted(plan.roles, key=lambda r: bool(r.host)):
        got = placements.get(spec.role, [])
        assert len(got) == spec.actors, (spec.role, len(got), spec.actors)
        for i, p in enumerate(got):
            assert len(p["gpu_ids"]) == spec.gpus, (spec.role, i, p["gpu_ids"])
            assert p["cuda_visible_devices"] == ",".join(p["gpu_ids"]), (spec.role, p)
            if spec.host:
                host = placements[spec.host][i]
                assert (p["node_id"], p["gpu_ids"]) == (host["node_id"], host["gpu_ids"]), (spec.role, i, p, host)
                continue
            for gpu in p["gpu_ids"]:
                key = (p["node_id"], gpu)
                assert key not in seen, f"{spec.role} {i} shares GPU {gpu} with {seen[key]}"
                seen[key] = f"{spec.role} {i}"
    pool = plan.teacher_pool
    assert len(seen) == plan.total_gpus + (pool.gpus if pool else 0)


def check_device_contract(actors) -> None:
    """Each GPU actor asked for at least one device (its model lives on its GPU), and every index it
    asked for is among its visible devices (a wrong one raises where it is asked: `actors.devices`)."""
    for role, group in actors.groups().items():
        for i, asked in enumerate(ray.get(group.call("device_requests"))):
            assert asked, f"{role} {i} never chose a device: its model would stay on the CPU of a GPU node"
            assert all(0 <= r["index"] < len(r["visible"]) for r in asked), (role, i, asked)


def test_simulated_gpu_node_runs_the_balanced_1p5b_plan_with_colocated_rollout_and_teacher(models, tmp_path, monkeypatch):
    from orchestrator.cli import start_local_ray

    # one corrupted step on the way, and learner rank 1 dies in its first set-up (Ray's workers inherit the variable)
    monkeypatch.setenv("FORESIGHT_FAULTS", "nan_teacher:7,learner_dies_in_setup:1")
    # 8 declared H100s (Ray's accelerator_type resource, as on a real node: the planner costs and balances)
    start_local_ray(num_cpus=4, num_gpus=8, resources={"accelerator_type:H100": 1.0}, logging_level="ERROR")
    try:
        cfg = load_config(SMOKE, run_overrides(models, tmp_path) + [
            "run.scale=1.5B", "rollout.backend=hf", "teacher.backend=hf", "learner.world_size=2", "rollout.num_workers=2",
            "run.steps=30", "eval.every=15", "geometry.every=0", "checkpoint.every=0", "eval.num_examples=200"])
        plan = resolve(cfg, SMOKE)
        # the planner's choice around the pinned ranks and workers: each teacher scorer on its rollout worker's GPU
        assert plan.layout_source == "balanced (gpu_time)" and plan.layout.colocated
        assert {r.role: (r.actors, r.gpus, r.share, r.host) for r in plan.roles} == {
            "rollout": (2, 1, 0.5, ""), "teacher": (2, 1, 0.5, "rollout"), "learner": (2, 1, 1.0, "")}
        assert plan.total_gpus == 4 and len(plan.bundles()) == 4
        trainer = OPDTrainer(cfg, plan, show_progress=False)
        trainer.start()
        try:
            assert trainer.learner_restarts == 1  # the death in start-up was retried like a later one
            check_matches_plan(plan, trainer.actors.placements())
            envs = ray.get(trainer.learner.call("rendezvous"))
            assert [e["RANK"] for e in envs] == ["0", "1"] and {e["WORLD_SIZE"] for e in envs} == {"2"}
            # the device contract: every rank's one GPU is its cuda:0 (LOCAL_RANK is the device DeepSpeed
            # selects), and every index any GPU actor's code asked for exists among its devices
            assert {e["LOCAL_RANK"] for e in envs} == {"0"}
            check_device_contract(trainer.actors)
            assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"} and {e["DS_ACCELERATOR"] for e in envs} == {"cpu"}
            open_ports = listeners(tree(os.getpid()))
            exposed = [entry for entry in open_ports if not is_loopback(entry[2])]
            assert open_ports and not exposed, f"listening beyond loopback: {exposed}"
            final = trainer.run()
        finally:
            trainer.shutdown()
    finally:
        ray.shutdown()
    client = trainer.tracker.client
    run_id = trainer.tracker.run_id
    kl = [m.value for m in sorted(client.get_metric_history(run_id, "train/reverse_kl"), key=lambda m: m.step)]
    acc = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/accuracy"))
    assert len(kl) == 30 and sum(kl[-5:]) < 0.8 * sum(kl[:5]), kl
    skipped = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/step_skipped"))
    assert [s for s, v in skipped if v] == [7]  # the NaN step was skipped on both ranks, the run went on
    assert acc[-1][0] == 30 and acc[-1][1] > acc[0][1], acc
    assert final["train/response_tokens"] > 0
    # the run calibrates the cost model for its GPU type (the layout from its plan params; the figures
    # are CPU ones here), and a plan for that GPU type takes the fit
    from orchestrator.calibrate import calibrate

    path, cal, _ = calibrate(plan.run_dir)
    assert path == plan.run_dir / "calibration.json" and cal.device == "H100" and cal.steps > 20
    again = resolve(load_config(SMOKE, run_overrides(models, tmp_path) + [
        "run.scale=1.5B", "rollout.backend=hf", "teacher.backend=hf", f"plan.calibration={path}", "run.name=next"]), SMOKE, cluster=ClusterSpec(1, 8, "H100", 80))
    assert again.throughput == cal.throughput and "cost model: measured:" in again.describe()


@pytest.fixture(scope="module")
def four_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 8, "num_gpus": 8})
    for _ in range(3):
        cluster.add_node(num_cpus=8, num_gpus=8)
    ray.init(address=cluster.address, logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.parametrize("overrides", [["run.scale=1.5B", "method.type=effopd"], ["run.scale=32B"],
                                       ["run.scale=32B", "teacher.shared=true"]],
                         ids=["1.5B-effopd", "32B", "32B-shared-teacher"])
def test_simulated_multi_node_placement_probes_follow_the_plan(four_nodes, fake_models, tmp_path, overrides):
    cfg = load_config(None, [f"models.student={fake_models / 'student'}", f"models.teacher={fake_models / 'teacher'}",
                             f"run.output_dir={tmp_path}", *overrides])
    plan = resolve(cfg, "<test>", resources=ray.cluster_resources())
    pools = assign_pools("s", [(cfg, plan)], "<test>")
    if plan.scale == "32B":  # what a sweep does: Tune reserves the trial's group, the trial launches into it
        placements = tune_trial_placements(cfg, plan, tmp_path)
        if pools:  # the trial started the shared pool (TP-4 replicas outside its group), which outlives it
            assert plan.role("teacher").pool and len(placements["teacher"]) == pools[0].replicas
            assert all(len(p["gpu_ids"]) == 4 for p in placements["teacher"])
            assert stop(pools[0])
    else:
        placements = probe_placements(plan)  # what `foresight plan --probe` does on a live cluster
    check_matches_plan(plan, placements)
    for spec in plan.roles:
        if spec.tp > 1:  # a TP engine is one actor: its GPUs are one bundle, on one node
            assert all(len(p["gpu_ids"]) == spec.tp for p in placements[spec.role])
    envs = learner_env(placements["learner"])
    nodes = {p["node_id"] for p in placements["learner"]}
    assert [e["RANK"] for e in envs] == list(range(len(envs))) and {e["WORLD_SIZE"] for e in envs} == {len(envs)}
    assert len({e["MASTER_ADDR"] for e in envs}) == 1
    assert {e["LOCAL_RANK"] for e in envs} == {0}  # each rank's one GPU is its cuda:0
    for node in nodes:  # ranks are numbered 0..n-1 on every node
        index = sorted(e["NODE_INDEX"] for e in envs if e["node_id"] == node)
        assert index == list(range(len(index))) and {e["LOCAL_WORLD_SIZE"] for e in envs if e["node_id"] == node} == {len(index)}
    if plan.scale == "32B":
        assert len(nodes) >= 2, "12 learner ranks cannot share one 8-GPU node"
        assert envs[0]["MASTER_ADDR"] != "127.0.0.1" or placements["learner"][0]["ip"] == "127.0.0.1"
        offsets, world = nccl_layout([plan.role("rollout").tp] * plan.role("rollout").actors)
        ranks = [set(range(o, o + plan.role("rollout").tp)) for o in offsets]
        assert offsets == [1, 5] and world == 9 and not set.intersection(*ranks)



def tune_trial_placements(cfg, plan, tmp_path) -> dict[str, list[dict]]:
    """A one-trial Tune sweep, short of loading models: Tune reserves the placement group from
    `SweepSpec.resources_of` (the trainable's empty bundle, then the plan's GPU bundles across
    nodes) and the trial launches its actors into it as `OPDTrial.setup` does (placement probes
    stand in for them); checks Tune reserved exactly the plan's bundles, returns the placements."""
    import json

    from ray import tune
    from ray.util import get_current_placement_group, placement_group_table

    from actors.group import PlacementProbe
    from orchestrator.placement import TrialActors, role_classes
    from orchestrator.trial import TRIAL, SweepSpec

    spec = SweepSpec("s", None, "<test>", trials={cfg.run.name: (cfg, plan)})

    def trial(config: dict) -> dict:
        pg = get_current_placement_group()
        probes = {role: {b: PlacementProbe for b in backends} for role, backends in role_classes().items()}
        actors = TrialActors.launch(plan, {}, {}, pg=pg, classes=probes)
        try:
            return {"placements": json.dumps(actors.placements(), default=str),
                    "bundles": json.dumps(list(placement_group_table(pg)["bundles"].values()))}
        finally:
            actors.kill()

    grid = tune.Tuner(tune.with_resources(trial, spec.resources_of), param_space={TRIAL: tune.grid_search([cfg.run.name])},
                      run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="probe", verbose=0)).fit()
    assert not grid.errors, grid.errors
    assert json.loads(grid[0].metrics["bundles"]) == [{k: float(v) for k, v in b.items() if v} for b in plan.bundles()]
    return json.loads(grid[0].metrics["placements"])
