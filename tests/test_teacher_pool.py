"""Shared teacher pools (orchestrator/teacher_pool.py) and the sweep cost around them
(orchestrator/sweep_cost.py): which trials share a pool, what they reserve, that a pool's scores
are the trial's own teacher's bit for bit (also after a replica is killed), and the sweep
simulation on hand-computed cases. The sweep end to end on a pool: test_e2e_sweep.py."""

from __future__ import annotations

import os
import signal

import pytest
import ray
import torch

from actors.rollout import RolloutWorker
from actors.teacher import TeacherScorer
from conftest import foresight, model_overrides
from core.config import load_config
from core.data_order import batch_indices
from core.scales import parse_cluster
from e2e_helpers import SMOKE
from orchestrator.actor_spec import actor_config
from orchestrator.plan import resolve
from orchestrator.sweep_cost import simulate
from orchestrator.teacher_pool import NAMESPACE, assign_pools, ensure, stop


def trial(models, tmp_path, name: str, *overrides: str):
    cfg = load_config(SMOKE, model_overrides(models) + [f"run.output_dir={tmp_path}", f"run.name={name}",
                                                        "learner.world_size=1", *overrides])
    return cfg, resolve(cfg, SMOKE, cpus=2)


def test_trials_with_the_same_teacher_share_one_pool_and_reserve_no_teacher(models, tmp_path):
    trials = [trial(models, tmp_path, "a", "teacher.shared=true", "run.seed=0"),
              trial(models, tmp_path, "b", "teacher.shared=true", "run.seed=1", "method.type=effopd"),
              trial(models, tmp_path, "c", "teacher.shared=true", "learner.logit_chunk_tokens=64"),  # scores differently
              trial(models, tmp_path, "sft", "teacher.shared=true", "rollout.source=teacher", "loss.type=sft"),
              trial(models, tmp_path, "own")]
    pools = assign_pools("sw", trials, "sweep.yaml")
    assert sorted(p.trials for p in pools) == [["a", "b"], ["c"]]
    ab = next(p for p in pools if p.trials == ["a", "b"])
    for cfg, plan in trials:
        teacher = plan.role("teacher")
        if cfg.run.name in ("sft", "own"):  # the off-policy control's teacher samples: its own
            assert teacher.pool == "" and plan.teacher_pool is None
            continue
        assert teacher.pool.startswith("sw-teacher-") and plan.teacher_pool.name == teacher.pool
        assert plan.params()["plan/teacher/pool"] == teacher.pool
        others = sum(r.cpus * r.actors for r in plan.roles if r.role != "teacher")
        assert sum(b["CPU"] for b in plan.bundles()) == pytest.approx(others) == pytest.approx(plan.total_cpus)
        with pytest.raises(KeyError):
            plan.first_bundle("teacher")
    own = trials[-1][1]
    assert sum(b["CPU"] for b in own.bundles()) == pytest.approx(sum(r.cpus * r.actors for r in own.roles))
    assert ab.key != next(p for p in pools if p.trials == ["c"]).key
    assert ab.acfg["pid_dir"].endswith(f"teacher_pools/{ab.name}/actors")


@pytest.mark.e2e
def test_pool_scores_equal_the_trials_own_teacher_bit_for_bit_even_after_a_killed_replica(models, tmp_path):
    trials = [trial(models, tmp_path, "a", "teacher.shared=true", "run.seed=0"),
              trial(models, tmp_path, "b", "teacher.shared=true", "run.seed=1")]
    pool, = assign_pools("bits", trials, "sweep.yaml")
    acfg_b = actor_config(*trials[1])  # the second trial's own settings, not the pool's (trial a's)
    batch = RolloutWorker(acfg_b).generate(1, batch_indices(1, 20000, 16, 1), None)
    want = TeacherScorer(acfg_b).score(batch, ref=True)
    from orchestrator.cli import start_local_ray

    start_local_ray(num_cpus=2, logging_level="ERROR")
    try:
        first, second = ensure(pool), ensure(pool)  # two trials start: one set of actors
        assert [a._actor_id for a in first] == [a._actor_id for a in second]
        ref = ray.put(batch)
        got = ray.get([first[0].score.remote(ref, ref=True), second[0].score.remote(ref, ref=True)])  # queued, not merged
        for out in got:
            assert out.keys() == want.keys() and all(torch.equal(out[k], want[k]) for k in want)
        pid = ray.get(first[0].placement.remote())["pid"]
        os.kill(pid, signal.SIGKILL)  # Ray restarts the replica (teacher.max_restarts); the call is retried
        again = ray.get(first[0].score.remote(ref, ref=True))
        assert ray.get(first[0].placement.remote())["pid"] != pid
        assert all(torch.equal(again[k], want[k]) for k in want)
        assert stop(pool) and not stop(pool)
        with pytest.raises(ValueError):
            ray.get_actor(pool.actor_name(0), namespace=NAMESPACE)
    finally:
        ray.shutdown()


def test_sweep_simulation_on_hand_computed_cases():
    node = parse_cluster("1x8xH100-80GB")
    # a pool of 2 GPUs and three 2-GPU trials of 1 h: all three beside the pool at once
    shared = simulate([([2], 1.0, 0)] * 3, [[2]], node)
    assert (shared.hours, shared.gpu_hours, shared.peak, shared.pool_gpus) == (1.0, 3 * 2 + 2 * 1.0, 3, 2)
    # the same trials with a 2-GPU teacher each: two at a time, then the third
    own = simulate([([2, 2], 1.0, -1)] * 3, [], node)
    assert (own.hours, own.gpu_hours, own.peak) == (2.0, 3 * 4 * 1.0, 2)
    # a pool is held from its first trial's start to its last trial's end (4 GPUs x 2 h); the trial
    # without it waits for those GPUs: pool+1 (0-1 h), pool+2 (1-2 h), then 3 (2-3 h)
    seq = simulate([([4], 1.0, 0), ([4], 1.0, 0), ([4], 1.0, -1)], [[4]], node)
    assert (seq.hours, seq.gpu_hours, seq.peak) == (3.0, 3 * 4 * 1.0 + 4 * 2.0, 1)
    assert simulate([([4, 4], 1.0, 0)], [[4]], node) is None  # the pool and its trial never fit together


def test_plan_shows_the_paper_grid_with_shared_pools_and_with_a_teacher_per_trial():
    out = foresight("plan", "experiments/paper_grid.yaml", "teacher.shared=true", "--cluster", "4x8xH100-80GB",
                    "--brief").stdout
    assert "# teacher pools (teacher.shared, models.teachers): " in out
    pools = [line for line in out.splitlines() if line.startswith("  paper_grid-teacher-")]
    assert len(pools) >= 4 and all("serves" in line for line in pools)  # one per scale at least
    assert "shared pool paper_grid-teacher-" in out and "not in this trial's reservation" in out
    shared = next(line for line in out.splitlines() if line.startswith("  shared pools "))
    own = next(line for line in out.splitlines() if line.startswith("  teacher per trial "))
    assert "reserved GPU-hours" in shared and "pools 0 GPUs" in own
    assert "shared pools vs a teacher per trial: " in out
