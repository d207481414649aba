"""Multi-teacher routing (orchestrator/routing.py) and its config checks, on hand cases: the shards
of a step per teacher and rollout worker, the per-teacher metrics from the actors' reports, and the
config refusing routes that cannot run. The run end to end: test_e2e_ray_job.py."""

from __future__ import annotations

import pytest
import torch

from actors.group import report
from core.config import ConfigError, load_config
from orchestrator.routing import group_indices, metric_name, route_metrics, shards


def test_without_a_route_the_cut_is_the_single_teacher_one():
    assert shards([5, 6, 7, 8, 9], 2, {}, None) == [(0, [5, 6, 7], "default"), (1, [8, 9], "default")]


def test_shards_are_cut_per_teacher_then_over_the_workers():
    groups = ["sum", "frac", "sum", "frac", "sum", "geo"]
    route = {"frac": "fractions"}  # "geo" is not routed: the default teacher
    got = shards([0, 1, 2, 3, 4, 5], 2, route, groups)
    assert got == [(0, [0, 2], "default"), (1, [4, 5], "default"), (0, [1], "fractions"), (1, [3], "fractions")]
    assert sorted(i for _, part, _ in got for i in part) == list(range(6))  # every prompt once
    assert shards([1, 3], 2, route, groups) == [(0, [1], "fractions"), (1, [3], "fractions")]  # no empty shard
    assert group_indices([4, 1, 0, 3], groups) == {"frac": [1, 3], "sum": [4, 0]}


def test_per_teacher_metrics_from_the_reports():
    batch = {"rewards": torch.tensor([1.0, 0.0, 1.0]), "logp": torch.tensor([[-1.0, -2.0], [-1.0, 0.0], [-3.0, 0.0]]),
             "response_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])}
    scores = {"logp": torch.tensor([[-0.5, -1.0], [-2.0, 0.0], [-1.0, 0.0]])}
    r, t = report("generate", (1, [0], None), batch), report("score", (batch,), scores)
    assert r == {"reward_sum": 2.0, "rows": 3.0}
    assert t == {"kl_sum": (-0.5 - 1.0 + 1.0 - 2.0), "tokens": 4.0}
    out = route_metrics(["default", "fractions", "default"], [r, {"reward_sum": 0.0, "rows": 2.0}, r],
                        [t, {"kl_sum": 1.0, "tokens": 2.0}, t])
    assert out == {"route/default/reward": 4.0 / 6.0, "route/default/reverse_kl": -5.0 / 8.0, "route/default/rows": 6.0,
                   "route/fractions/reward": 0.0, "route/fractions/reverse_kl": 0.5, "route/fractions/rows": 2.0}
    assert metric_name("foresight/math_twin/sum") == "foresight_math_twin_sum"


@pytest.mark.parametrize("overrides, reason", [
    (["teacher.route={a: x}"], "needs task.group_key"),
    (["task.group_key=data_source", "teacher.route={a: x}"], "not among models.teachers"),
    (["task.group_key=data_source", "models.teachers={x: /m}"], "not routed to by teacher.route"),
    (["task.group_key=data_source", "models.teachers={x: /m}", "teacher.route={a: x}", "rollout.source=teacher",
      "loss.type=sft", "loss.importance_correction=false"], "off-policy control"),
])
def test_routes_that_cannot_run_are_refused(overrides, reason, tmp_path):
    files = ["task.type=jsonl", f"task.train_path={tmp_path / 'a.jsonl'}", f"task.test_path={tmp_path / 'b.jsonl'}"]
    with pytest.raises(ConfigError) as err:  # refused by the schema, before any file is read
        load_config(None, files + overrides)
    assert reason in str(err.value)
