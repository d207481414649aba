"""Teachers as a service: one pool of teacher replicas per teacher, shared by every trial of a sweep.

A sweep is many trials over the same frozen teacher (the papers' grid: 4 methods x seeds per scale),
so a teacher per trial loads and holds the same model again in every concurrent trial. With
`teacher.shared: true` the trials that score with the same teacher (same `identity`: model,
reference student, backend, tensor parallelism, engine settings and scoring budget) call one pool
instead:

- **What it is**: `replicas` teacher actors (the trial's own scorer class), each a detached named Ray
  actor `<pool>/<i>` in namespace `foresight`, asking Ray for the role's CPUs and GPUs (a TP engine's
  GPUs on one node, as any actor's). The first trial that needs the pool starts it (`ensure`);
  every other trial, a retried one and a restored sweep's (on a cluster that outlived a killed
  driver) get the same actors by name. The driver stops a pool when the last of its trials ends
  (`orchestrator/scheduler.py`), and every pool when the sweep ends (also on Ctrl-C and
  `ray job stop`). Nothing in it listens on a port.
- **Why named actors and not Ray Serve**: the trials already call their teachers as actors, passing
  each rollout shard as an object reference, so a pool of actors changes nothing on the hot path
  (no copy of the batch through an HTTP or handle router, no second serialization), keeps every
  request a whole trial shard (no merging, hence bit-identical scores: below), needs no controller
  or proxy actors, and restarts through Ray's `max_restarts` like the trial's own actors. Serve's
  value (request batching across callers, autoscaling, HTTP ingress) is what this pool must not do
  (merging) or does not need.
- **Scores**: each call scores one trial's shard on one replica, exactly as the trial's own teacher
  would (same class, checkpoint, dtype, micro-batch and chunk budget), so a trial's metrics with the
  pool equal its metrics with its own teacher bit for bit. Calls from different trials queue on a
  replica (an actor runs one call at a time); they are never batched together.
- **Size** (`pool_replicas`): GPU plans, the replica count that minimizes the group's reserved
  GPU-hours, each trial spreading its shards over every replica and waiting behind the others'
  calls as often as the pool is busy (formula there); CPU plans, the largest count a trial asks
  for. `scheduler.teacher_replicas` pins it.
- **Accounting**: a pooled trial's placement group (and Tune's reservation) holds no teacher; the
  pool's GPUs are counted once for the sweep (`sweep_gpu_summary`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from core.config import ConfigError, ExperimentConfig
from orchestrator.balance import COUNTS
from orchestrator.plan import ResolvedPlan, RoleSpec

log = logging.getLogger(__name__)
NAMESPACE = "foresight"
"""Ray namespace of every pool's named actors (a restored driver is a new job: it finds them here)."""


@dataclass
class PoolSpec:
    """One shared teacher pool: `role.actors` replicas of `role` started with `acfg`."""

    name: str
    key: str
    role: RoleSpec
    acfg: dict[str, Any]
    restarts: int
    trials: list[str] = field(default_factory=list)
    demand: float = 0.0
    """Replica-seconds per second the trials that run at once ask of it (0: not costed)."""

    @property
    def replicas(self) -> int:
        return self.role.actors

    @property
    def gpus(self) -> int:
        return self.role.gpus * self.role.actors

    def actor_name(self, i: int) -> str:
        return f"{self.name}/{i}"

    def describe(self) -> str:
        where = f"{self.role.gpus} GPU(s)" if self.role.gpus else f"{self.role.cpus:g} CPU"
        size = (f"busy {self.demand / self.replicas:.0%} with {self.demand:.2f} replica-s/s asked"
                if self.demand else "sized by the largest trial's count")
        return (f"  {self.name}: {self.replicas} {self.role.backend} teacher replica(s), {where} each "
                f"({size}); serves {len(self.trials)} trial(s): {', '.join(self.trials)}")


def identity(acfg: dict[str, Any], role: RoleSpec) -> dict[str, Any]:
    """What a teacher replica's scores depend on: two trials with equal identities get the same
    scores from the same replica. The seed is left out (scoring samples nothing)."""
    out = {"backend": role.backend, "tp": role.tp, "gpus": role.gpus, "teacher": acfg["teacher_path"],
           "reference": acfg["student_path"], "budget": [acfg["learner"]["max_tokens_per_gpu"],
                                                         acfg["learner"]["logit_chunk_tokens"]]}
    if role.backend == "vllm":
        rc = acfg["rollout"]
        out["engine"] = [acfg["engine_util"].get("teacher", rc["gpu_memory_utilization"]), rc["vllm_kv_cache_mb"],
                         acfg["max_model_len"]["teacher_path"], acfg["loss"]["teacher_topk"] or 0]
    return out


def pool_key(acfg: dict[str, Any], role: RoleSpec) -> str:
    return hashlib.sha256(json.dumps(identity(acfg, role), sort_keys=True).encode()).hexdigest()[:10]


def pool_name(sweep: str, key: str) -> str:
    return f"{sweep}-teacher-{key}"


def pool_replicas(plans: list[ResolvedPlan], at_once: int) -> tuple[int, float]:
    """(replicas R, demand rho at R) for one pool's trials `plans`, `at_once` of them running together.

    CPU plans, or without a cost model: the largest count a trial asks for. GPU plans: the R that
    minimizes the group's reserved GPU-hours,
        sum_i g_i T_i'(R) s_i + R p * sum_i T_i'(R) s_i / k,
    where g_i are trial i's own GPUs, s_i its steps, p the teacher's TP, k = min(at_once, trials),
    T_i(R) its step with its shards spread over R replicas (`Costing.cost`), and
    T_i'(R) = T_i(R) + u t_i(R): each teacher call waits behind another trial's a share u = rho / R of
    the time (rho = sum over the k busiest of R t_i(R) / T_i(R); R with u >= 1 cannot keep up)."""
    own = [p.layout.teacher if p.layout is not None else p.role("teacher").actors for p in plans]
    if not plans[0].gpu or any(p.costing is None or p.layout is None for p in plans):
        return max(own), 0.0
    k = max(1, min(at_once, len(plans)))
    tp = plans[0].layout.teacher_tp
    best: tuple[float, int, float] | None = None
    for r in (n for n in COUNTS if n * tp <= plans[0].cluster.gpus):
        costs = [p.costing.cost(replace(p.layout, teacher=r)) for p in plans]
        rates = sorted((r * c.seconds["teacher"] / c.step_seconds for c in costs), reverse=True)
        rho = sum(rates[:k])
        if rho >= r:
            continue
        steps = [c.step_seconds + rho / r * c.seconds["teacher"] for c in costs]
        trial_h = sum(p.total_gpus * t * p.steps for p, t in zip(plans, steps)) / 3600
        pool_h = r * tp * sum(t * p.steps for p, t in zip(plans, steps)) / k / 3600
        if best is None or trial_h + pool_h < best[0]:
            best = (trial_h + pool_h, r, rho)
    return (best[1], best[2]) if best else (max(own), 0.0)


def assign_pools(sweep: str, trials: list[tuple[ExperimentConfig, ResolvedPlan]], file: str | Path,
                 replicas: int | None = None) -> list[PoolSpec]:
    """Group the trials whose plans ask for a shared teacher by `identity`, size one pool per group,
    and point each trial's teacher role at its pool (name and replica count). Raises ConfigError
    when a pool and a trial cannot run side by side on the cluster."""
    from orchestrator.actor_spec import actor_config

    groups: dict[str, list[tuple[ExperimentConfig, ResolvedPlan]]] = {}
    for cfg, plan in trials:
        role = plan.role("teacher")
        if role is not None and role.pool:
            groups.setdefault(pool_key(actor_config(cfg, plan), role), []).append((cfg, plan))
    pools = []
    for key, members in groups.items():
        cfg0, plan0 = members[0]
        name = pool_name(sweep, key)
        n, demand = (replicas, 0.0) if replicas else pool_replicas([p for _, p in members], _at_once(members))
        demand = demand or 0.0
        role = replace(plan0.role("teacher"), actors=n, pool=name)
        acfg = actor_config(cfg0, plan0, run_dir=cfg0.run.output_dir / "teacher_pools" / name)
        pools.append(PoolSpec(name, key, role, acfg, cfg0.teacher.max_restarts, [c.run.name for c, _ in members], demand))
        for _, plan in members:
            plan.roles = [replace(r, actors=n, pool=name) if r.role == "teacher" else r for r in plan.roles]
            plan.teacher_pool = pools[-1]
            if plan.layout is not None and plan.costing is not None:  # its shards spread over the pool's replicas
                plan.layout = replace(plan.layout, teacher=n)
                plan.cost = plan.costing.cost(plan.layout)
    pools += route_pools(sweep, trials, replicas)
    for cfg, plan in trials:
        _check_fits(cfg, plan, file)
    return pools


def route_pools(sweep: str, trials: list[tuple[ExperimentConfig, ResolvedPlan]], replicas: int | None) -> list[PoolSpec]:
    """Multi-teacher runs: one pool per named teacher (`models.teachers`) and identity, shared by the
    trials that route to it; each trial's `plan.route_pools` maps teacher name -> pool."""
    from orchestrator.actor_spec import actor_config, named_teacher_config

    found: dict[str, PoolSpec] = {}
    for cfg, plan in trials:
        base = plan.role("teacher")
        for name, folder in cfg.models.teachers.items():
            role = replace(base, actors=replicas or cfg.teacher.num_workers or 1, pool="shared")
            acfg = named_teacher_config(actor_config(cfg, plan), cfg, Path(folder))
            key = pool_key(acfg, role)
            if key not in found:
                pname = pool_name(sweep, key)
                acfg["pid_dir"] = str((cfg.run.output_dir / "teacher_pools" / pname / "actors").resolve())
                found[key] = PoolSpec(pname, key, replace(role, pool=pname), acfg, cfg.teacher.max_restarts)
            pool = found[key]
            pool.trials.append(cfg.run.name)
            plan.route_pools[name] = pool
        if cfg.teacher.route:
            plan.notes.append("teacher route (task.group_key " f"{cfg.task.group_key}): " + ", ".join(
                f"{g} -> {t} ({plan.route_pools[t].name})" for g, t in cfg.teacher.route.items()) + "; other groups -> models.teacher")
    return list(found.values())


def _at_once(members: list[tuple[ExperimentConfig, ResolvedPlan]]) -> int:
    """Trials of this group that run together: what the cluster fits (GPU plans: `concurrent`; CPU:
    the cluster's CPUs over a trial's)."""
    plan = members[0][1]
    if plan.gpu:
        return plan.concurrent
    return max(1, int((plan.available_cpus + 1e-9) // max(plan.total_cpus, 1e-9)))


def _check_fits(cfg: ExperimentConfig, plan: ResolvedPlan, file: str | Path) -> None:
    """A CPU trial and every pool it calls must fit the cluster's CPUs together."""
    if plan.gpu or plan.dry_run:
        return
    pools = {p.name: p for p in [plan.teacher_pool, *plan.route_pools.values()] if p is not None}
    need = plan.total_cpus + sum(p.role.cpus * p.replicas for p in pools.values())
    if pools and need > plan.available_cpus + 1e-9:
        raise ConfigError(file, "teacher.shared" if plan.teacher_pool else "models.teachers",
                          f"{cfg.run.name}: the trial ({plan.total_cpus:g} CPUs) and the teacher pools it calls "
                          f"({', '.join(f'{p.name}: {p.replicas} x {p.role.cpus:g}' for p in pools.values())}) need "
                          f"{need:g} CPUs; the Ray cluster has {plan.available_cpus:g} (set scheduler.teacher_replicas, "
                          "or teacher.num_cpus)")


# ----------------------------------------------------------------------------- runtime
START_TIMEOUT_S = 1800.0
"""How long a trial waits for its pool's replicas to be placed and loaded (a 32B TP-4 engine takes
minutes; a cluster full of other trials frees GPUs as they end)."""


def ensure(pool: PoolSpec, cls: type | None = None) -> list:
    """The pool's replicas, by name: started by the first trial that needs them (detached, so they
    outlive it; Ray's `get_if_exists` makes concurrent first trials get the same actors). `cls`: the
    actor class (default the backend's scorer; placement probes in `foresight plan --probe`'s kind)."""
    import ray

    from actors.group import ACTOR_ENV
    from orchestrator.placement import role_classes

    cls = ray.remote(cls or role_classes()["teacher"][pool.role.backend])
    opts = {**pool.role.options(), "max_restarts": pool.restarts, "max_task_retries": pool.restarts,
            "lifetime": "detached", "namespace": NAMESPACE, "get_if_exists": True,
            "scheduling_strategy": "DEFAULT",  # not in the calling trial's placement group (Tune captures child actors)
            "runtime_env": {"env_vars": dict(ACTOR_ENV)}}
    actors = [cls.options(name=pool.actor_name(i), **opts).remote(pool.acfg, i) for i in range(pool.replicas)]
    try:
        ray.get([a.placement.remote() for a in actors], timeout=START_TIMEOUT_S)  # placed and loaded
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"teacher pool {pool.name}: {pool.replicas} replica(s) of {pool.role.options()} were not "
                           f"placed within {START_TIMEOUT_S:g} s (the cluster is full: lower scheduler.max_concurrent "
                           "or scheduler.teacher_replicas)") from None
    return actors


def stop(pool: PoolSpec) -> bool:
    """Kill every replica of the pool that is alive (idempotent); whether any was."""
    import ray

    found = False
    for i in range(pool.replicas):
        try:
            ray.kill(ray.get_actor(pool.actor_name(i), namespace=NAMESPACE), no_restart=True)
            found = True
        except ValueError:
            pass
    return found


@contextmanager
def stopped_after(pools: list[PoolSpec]) -> Iterator[None]:
    """Stop the pools however the block (the sweep) ends; trials start them (`ensure`)."""
    try:
        yield
    finally:
        for pool in pools:
            if stop(pool):
                print(f"teacher pool {pool.name} stopped", flush=True)


def bind(cfg: ExperimentConfig, plan: ResolvedPlan, pools: list[PoolSpec], sweep: str) -> ResolvedPlan:
    """A search's trial (planned when Optuna samples it) pointed at the running pools of its
    identities: the shared teacher's (a trial whose sampled values changed its teacher's identity
    gets its own teacher instead) and its named teachers' (the sweep's pool of that name, else a
    pool of its own, stopped with the sweep's by name)."""
    from orchestrator.actor_spec import actor_config

    by_name = {p.name: p for p in pools}
    for spec in route_pools(sweep, [(cfg, plan)], None):
        if spec.name not in by_name:
            pools.append(spec)
            by_name[spec.name] = spec
    plan.route_pools = {name: by_name[pool.name] for name, pool in plan.route_pools.items()}
    role = plan.role("teacher")
    if role is None or role.pool != "shared":
        return plan
    key = pool_key(actor_config(cfg, plan), role)
    pool = next((p for p in pools if p.key == key), None)
    if pool is None:
        log.warning("%s: its teacher differs from every shared pool's (sampled values change it): it starts its own",
                    cfg.run.name)
    new = replace(role, pool=pool.name, actors=pool.replicas) if pool else replace(role, pool="")
    plan.roles = [new if r.role == "teacher" else r for r in plan.roles]
    plan.teacher_pool = pool
    return plan
