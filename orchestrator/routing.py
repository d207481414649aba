"""Multi-teacher runs: which teacher scores which rollout shard, and the per-teacher metrics.

With `task.group_key` every example has a group (verl's `data_source`, or any column), and
`teacher.route` maps groups to named teachers (`models.teachers`; unlisted groups go to
`models.teacher`, named "default" here). A step's prompts are cut per teacher, in the teachers'
name order, then each teacher's prompts over the rollout workers as before: every shard belongs to
one teacher, so no batch is ever split and merged across teachers, and a shard still holds whole
GRPO groups (every sample of a prompt). Without a route there is one teacher and the cut is the
single-teacher one: shard i = worker i's contiguous part.

Per-teacher metrics, from what the actors report with each call (`actors.group.Placed.timed`):
`route/<teacher>/reward` (mean sequence reward), `route/<teacher>/reverse_kl` (mean over tokens of
log pi_rollout(y_t) - log pi_T(y_t): the sampled reverse-KL estimate at the sampling policy), and
`route/<teacher>/rows`.
"""

from __future__ import annotations

import re
from typing import Any

from actors.group import split

DEFAULT = "default"
"""The teacher of `models.teacher` in routes and metric names."""


def metric_name(value: Any) -> str:
    """A group or teacher name as an MLflow metric path segment."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(value)).strip("_") or "none"


def group_indices(indices: list[int], groups: list[Any]) -> dict[Any, list[int]]:
    """`indices` by the group of each (groups in sorted order, indices in their order)."""
    out: dict[Any, list[int]] = {}
    for i in indices:
        out.setdefault(groups[i], []).append(i)
    return {g: out[g] for g in sorted(out, key=str)}


def shards(indices: list[int], workers: int, route: dict[str, str], groups: list[Any] | None) -> list[tuple[int, list[int], str]]:
    """(rollout worker, prompt indices, teacher) of every shard of a step, in batch order."""
    if not route or groups is None:
        return [(w, part, DEFAULT) for w, part in enumerate(split(indices, workers))]
    by_teacher: dict[str, list[int]] = {}
    for i in indices:
        by_teacher.setdefault(route.get(str(groups[i]), DEFAULT), []).append(i)
    out = []
    for teacher in sorted(by_teacher):
        out += [(w, part, teacher) for w, part in enumerate(split(by_teacher[teacher], workers)) if part]
    return out


def route_metrics(teachers: list[str], rollout_meta: list[dict[str, float]],
                  teacher_meta: list[dict[str, float]]) -> dict[str, float]:
    """`route/<teacher>/*` from the shards' reports (module docstring)."""
    sums: dict[str, dict[str, float]] = {}
    for name, r, t in zip(teachers, rollout_meta, teacher_meta):
        acc = sums.setdefault(name, {"reward": 0.0, "rows": 0.0, "kl": 0.0, "tokens": 0.0})
        acc["reward"] += r.get("reward_sum", 0.0)
        acc["rows"] += r.get("rows", 0.0)
        acc["kl"] += t.get("kl_sum", 0.0)
        acc["tokens"] += t.get("tokens", 0.0)
    out = {}
    for name, acc in sums.items():
        key = f"route/{metric_name(name)}"
        out.update({f"{key}/reward": acc["reward"] / max(acc["rows"], 1.0),
                    f"{key}/reverse_kl": acc["kl"] / max(acc["tokens"], 1.0), f"{key}/rows": acc["rows"]})
    return out
