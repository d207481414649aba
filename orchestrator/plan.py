"""Resolve a validated config into the actor/resource layout and check it fits, before launch.

`foresight plan CONFIG` prints this; `foresight run` checks it first and exits 2 when the plan
asks for more than the cluster has. The available CPUs are the live Ray cluster's when one is
reachable ($RAY_ADDRESS, as inside `ray job submit`), else this machine's `os.cpu_count()`
(the local Ray that `foresight run` starts).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config import ConfigError, EffOPD, ExperimentConfig
from orchestrator.tracking import resolve_uri


@dataclass(frozen=True)
class RoleGroup:
    role: str
    actors: int
    cpus_per_actor: float
    note: str = ""

    @property
    def cpus(self) -> float:
        return self.actors * self.cpus_per_actor


@dataclass
class ResolvedPlan:
    """Runtime values derived from the config (never written back into it)."""

    run_dir: Path
    tracking_uri: str
    groups: list[RoleGroup] = field(default_factory=list)
    available_cpus: float = 0.0

    @property
    def total_cpus(self) -> float:
        return sum(g.cpus for g in self.groups)

    def describe(self) -> str:
        lines = [f"run dir:       {self.run_dir}", f"mlflow:        {self.tracking_uri}", "actor groups:"]
        for g in self.groups:
            lines.append(f"  {g.role:<10} {g.actors} x {g.cpus_per_actor:g} CPU  {g.note}")
        lines.append(f"total:         {self.total_cpus:g} of {self.available_cpus:g} CPUs")
        return "\n".join(lines)


def available_cpus() -> float:
    """CPUs of the Ray cluster this process would use."""
    if os.environ.get("RAY_ADDRESS"):
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
        return float(ray.cluster_resources().get("CPU", 0))
    return float(os.cpu_count() or 1)


def resolve(cfg: ExperimentConfig, file: str | Path | None = None, cpus: float | None = None) -> ResolvedPlan:
    """Layout + fit check. Raises ConfigError (file, key, reason) when it cannot run here."""
    plan = ResolvedPlan(run_dir=cfg.run_dir, tracking_uri=resolve_uri(cfg.tracking.uri, cfg.run.output_dir))
    plan.groups = [
        RoleGroup("rollout", cfg.rollout.num_workers, cfg.rollout.num_cpus, "student sampling (HF generate)"),
        RoleGroup("teacher", cfg.teacher.num_workers, cfg.teacher.num_cpus, "teacher log-probs"),
        RoleGroup("learner", cfg.learner.world_size, cfg.learner.num_cpus_per_rank, "DeepSpeed ZeRO-3 ranks (gloo)"),
    ]
    if isinstance(cfg.method, EffOPD):
        plan.groups.append(RoleGroup("evaluator", cfg.method.num_evaluators, cfg.method.evaluator_cpus,
                                     f"EffOPD candidate scoring, {cfg.method.num_candidates} candidates"))
    plan.available_cpus = available_cpus() if cpus is None else cpus
    if cfg.learner.world_size > plan.available_cpus:
        raise ConfigError(file, "learner.world_size",
                          f"{cfg.learner.world_size} ranks but the Ray cluster has {plan.available_cpus:g} CPUs")
    if plan.total_cpus > plan.available_cpus + 1e-9:
        raise ConfigError(file, "learner.num_cpus_per_rank",
                          f"the plan needs {plan.total_cpus:g} CPUs ({', '.join(f'{g.role} {g.cpus:g}' for g in plan.groups)}) "
                          f"but the Ray cluster has {plan.available_cpus:g}")
    return plan
