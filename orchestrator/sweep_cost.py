"""A GPU sweep's cost on its cluster, with shared teacher pools and with a teacher per trial.

The sweep is simulated as the driver and Tune run it: a pool's replicas are placed when its first
trial starts (first-fit, each engine's GPUs on one node; that trial waits until both fit) and held
until the last of its trials ends (the driver stops the pool then: `orchestrator/scheduler.py`);
trials start in file order whenever their bundles
fit the GPUs left (a later trial may start before an earlier one that does not fit yet) and hold
them for their planned wall time (steps x the plan's seconds per step). Reserved GPU-hours = sum
over trials of their GPUs x wall time + each pool's GPUs x the time it was held.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from core.scales import ClusterSpec, first_fit


@dataclass(frozen=True)
class SweepCost:
    """What a sweep reserves: `hours` of wall time, `gpu_hours` reserved, `pool_gpus` held throughout,
    `peak` trials running at once, `trial_gpus` each trial's own GPUs."""

    hours: float
    gpu_hours: float
    pool_gpus: int
    """The pools' GPUs, summed (each held from its first trial's start to its last trial's end)."""
    peak: int
    trial_gpus: tuple[int, ...]


def simulate(trials: list[tuple[list[int], float, int]], pools: list[list[int]], cluster: ClusterSpec) -> SweepCost | None:
    """`trials`: (GPUs per bundle, wall hours, index of its pool or -1) in start order; `pools`: GPUs
    per bundle of each pool. None when the trials cannot all run."""
    free = cluster.per_node
    pool_nodes: dict[int, list[tuple[int, int]]] = {}
    started: dict[int, float] = {}
    left = [sum(1 for t in trials if t[2] == k) for k in range(len(pools))]
    pending = list(range(len(trials)))
    running: list[tuple[float, int, list[tuple[int, int]]]] = []  # (end, trial, [(node, gpus)])
    now, peak, gpu_hours = 0.0, 0, 0.0
    while pending or running:
        for i in list(pending):
            bundles, hours, pool = trials[i]
            trial_free = list(free)
            if pool >= 0 and pool not in pool_nodes:  # its first trial starts the pool
                nodes = first_fit(pools[pool], trial_free)
                if nodes is None:
                    continue
            if first_fit(bundles, trial_free) is None:
                continue
            if pool >= 0 and pool not in pool_nodes:
                pool_nodes[pool] = list(zip(first_fit(pools[pool], free), pools[pool]))
                started[pool] = now
            heapq.heappush(running, (now + hours, i, list(zip(first_fit(bundles, free), bundles))))
            pending.remove(i)
            gpu_hours += sum(bundles) * hours
        peak = max(peak, len(running))
        if not running:
            return None  # what is left does not fit even on an idle cluster
        now, i, held = heapq.heappop(running)
        pool = trials[i][2]
        if pool >= 0:
            left[pool] -= 1
            if left[pool] == 0:  # its last trial ended: the driver stops the pool
                held = held + pool_nodes[pool]
                gpu_hours += sum(pools[pool]) * (now - started[pool])
        for node, gpus in held:
            free[node] += gpus
    return SweepCost(now, gpu_hours, sum(sum(b) for b in pools), peak, tuple(sum(b) for b, _, _ in trials))


def sweep_cost(plans: list[tuple[Any, Any]], pools: list[Any]) -> SweepCost | None:
    """The sweep of `plans` [(cfg, ResolvedPlan)] with `pools` [PoolSpec] on the plans' cluster."""
    cluster = plans[0][1].cluster
    if cluster is None or any(plan.cost is None for _, plan in plans):
        return None
    names = [p.name for p in pools]
    trials = []
    for _, plan in plans:
        teacher = plan.role("teacher")
        pool = names.index(teacher.pool) if teacher is not None and teacher.pool in names else -1
        trials.append(([int(b.get("GPU", 0)) for b in plan.bundles()], plan.cost.step_seconds * plan.steps / 3600, pool))
    return simulate(trials, [[p.role.gpus] * p.replicas for p in pools], cluster)


def describe(label: str, cost: SweepCost | None) -> str:
    if cost is None:
        return f"  {label:<18} does not fit this cluster"
    lo, hi = min(cost.trial_gpus), max(cost.trial_gpus)
    each = f"{lo}" if lo == hi else f"{lo}-{hi}"
    return (f"  {label:<18} trials {each} GPUs each, pools {cost.pool_gpus} GPUs; up to {cost.peak} trials at once; "
            f"~{cost.hours:,.1f} h wall, ~{cost.gpu_hours:,.0f} reserved GPU-hours")
