"""Resolve a validated config into the actor/resource layout and check it fits, before launch.

`foresight plan CONFIG` prints this; `foresight run` checks it first and exits 2 when the plan
cannot run. CPU (tiny) scales are checked against the CPUs of the Ray cluster this process
would use: the live cluster's when one is reachable ($RAY_ADDRESS, as inside `ray job submit`),
else this machine's `os.cpu_count()` (the local Ray that `foresight run` starts).

GPU scales resolve through the scale registry (`orchestrator/scales.py`) to vLLM engines x TP,
teacher replicas x TP, ZeRO-3 learner ranks and an evaluator pool on spare GPUs.
`foresight plan CONFIG --cluster 4x8xH100-80GB` checks such a plan without GPUs (dry run):
memory per GPU, placement on the nodes, concurrent trials, GPU-hours.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config import ConfigError, EffOPD, ExperimentConfig, check_paths
from orchestrator.scales import SCALES, ClusterSpec, GpuPlan, concurrent_trials, gpu_hours, plan_gpus
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
    gpu: GpuPlan | None = None
    cluster: ClusterSpec | None = None
    concurrent: int = 1
    gpu_hours: float = 0.0
    num_evaluators: int = 0
    """EffOPD evaluator-pool size P (configured, or derived from the free resources)."""

    @property
    def total_cpus(self) -> float:
        return sum(g.cpus for g in self.groups)

    def describe(self) -> str:
        lines = [f"run dir:       {self.run_dir}", f"mlflow:        {self.tracking_uri}"]
        if self.gpu is not None:
            lines.append(f"cluster:       {self.cluster} ({self.cluster.gpus} GPUs)")
            lines.append(f"scale {self.gpu.scale}: {self.gpu.gpus} GPUs per trial, {self.concurrent} trial(s) at once, "
                         f"~{self.gpu_hours:,.0f} GPU-hours")
            for role in ("rollout", "teacher", "learner", "evaluator"):
                bundles = [b for b in self.gpu.bundles if b.role == role]
                if bundles:
                    lines.append(f"  {role:<10} {len(bundles)} x {bundles[0].gpus} GPU  {bundles[0].mem_gb:6.1f} GB/GPU")
            for i, roles in enumerate(self.gpu.placement):
                if roles:
                    lines.append(f"  node {i}: {', '.join(roles)}")
            lines.append("  (model paths are checked on the cluster at launch)")
            return "\n".join(lines)
        lines.append("actor groups:")
        for g in self.groups:
            lines.append(f"  {g.role:<10} {g.actors} x {g.cpus_per_actor:g} CPU  {g.note}")
        lines.append(f"total:         {self.total_cpus:g} of {self.available_cpus:g} CPUs")
        return "\n".join(lines)


def cluster_resources() -> dict[str, float]:
    """Resources of the Ray cluster this process would use ({} keys absent = 0)."""
    if os.environ.get("RAY_ADDRESS"):
        import ray

        if not ray.is_initialized():
            ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
        return dict(ray.cluster_resources())
    return {"CPU": float(os.cpu_count() or 1)}


def resolve(cfg: ExperimentConfig, file: str | Path | None = None, cpus: float | None = None,
            cluster: ClusterSpec | None = None) -> ResolvedPlan:
    """Layout + fit check. Raises ConfigError (file, key, reason) when it cannot run.

    With `cluster`, a dry run: the plan is checked against that cluster spec and model paths
    are not checked (they live on the cluster).
    """
    scale = SCALES[cfg.run.scale]
    plan = ResolvedPlan(run_dir=cfg.run_dir, tracking_uri=resolve_uri(cfg.tracking.uri, cfg.run.output_dir))
    if scale.gpu and cluster is not None:
        return _gpu_plan(cfg, plan, cluster, file)
    if cluster is None:
        check_paths(cfg, file)
    plan.groups = [
        RoleGroup("rollout", cfg.rollout.num_workers, cfg.rollout.num_cpus,
                  "student sampling (vLLM engine)" if cfg.rollout.backend == "vllm" else "student sampling (HF generate)"),
        RoleGroup("teacher", cfg.teacher.num_workers, cfg.teacher.num_cpus,
                  "teacher log-probs (vLLM prompt log-probs)" if cfg.teacher.backend == "vllm" else "teacher log-probs"),
        RoleGroup("learner", cfg.learner.world_size, cfg.learner.num_cpus_per_rank, "DeepSpeed ZeRO-3 ranks (gloo)"),
    ]
    resources = {"CPU": cpus} if cpus is not None else cluster_resources()
    plan.available_cpus = float(resources.get("CPU", 0))
    if isinstance(cfg.method, EffOPD):
        plan.num_evaluators = cfg.method.num_evaluators or auto_evaluators(
            plan.available_cpus - plan.total_cpus, cfg.method.evaluator_cpus, cfg.method.num_candidates)
        plan.groups.append(RoleGroup("evaluator", plan.num_evaluators, cfg.method.evaluator_cpus,
                                     f"EffOPD candidate scoring, {cfg.method.num_candidates} candidates"))
    if scale.gpu:
        raise ConfigError(file, "run.scale", f"scale {scale.name} needs GPUs and this Ray cluster has "
                          f"{resources.get('GPU', 0):g}; check the plan without GPUs with "
                          "`foresight plan CONFIG --cluster 4x8xH100-80GB`")
    if cfg.learner.weight_sync == "nccl":
        raise ConfigError(file, "learner.weight_sync", "nccl broadcasts between CUDA GPUs and this plan runs on "
                                                       "CPUs; use auto or object_store")
    if cfg.learner.world_size > plan.available_cpus:
        raise ConfigError(file, "learner.world_size",
                          f"{cfg.learner.world_size} ranks but the Ray cluster has {plan.available_cpus:g} CPUs")
    if plan.total_cpus > plan.available_cpus + 1e-9:
        raise ConfigError(file, "learner.num_cpus_per_rank",
                          f"the plan needs {plan.total_cpus:g} CPUs ({', '.join(f'{g.role} {g.cpus:g}' for g in plan.groups)}) "
                          f"but the Ray cluster has {plan.available_cpus:g}")
    return plan


def auto_evaluators(free: float, per_evaluator: float, candidates: int) -> int:
    """min(5, candidates + 1, what the free resources allow), at least 1."""
    fit = int(free // per_evaluator + 1e-9) if per_evaluator > 0 else candidates + 1
    return max(1, min(5, candidates + 1, fit))


def _gpu_plan(cfg: ExperimentConfig, plan: ResolvedPlan, cluster: ClusterSpec, file) -> ResolvedPlan:
    scale = SCALES[cfg.run.scale]
    evaluators = 0
    if isinstance(cfg.method, EffOPD):
        spare = cluster.gpus - (scale.rollout_engines * scale.rollout_tp + scale.teacher_replicas * scale.teacher_tp
                                + scale.learner_ranks)
        evaluators = cfg.method.num_evaluators or auto_evaluators(spare, scale.evaluator_tp, cfg.method.num_candidates)
    plan.num_evaluators = evaluators
    seq_len = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    plan.cluster = cluster
    plan.gpu = plan_gpus(scale, cluster, seq_len=seq_len, tokens_per_gpu=cfg.learner.max_tokens_per_gpu,
                         gpu_memory_utilization=cfg.rollout.gpu_memory_utilization, evaluators=evaluators)
    if plan.gpu.errors:
        raise ConfigError(file, "run.scale", f"{scale.name} on {cluster}: " + "; ".join(plan.gpu.errors))
    plan.concurrent = concurrent_trials(plan.gpu, cluster)
    plan.gpu_hours = gpu_hours(scale, cluster, plan.gpu, steps=cfg.run.steps, prompts=cfg.rollout.batch_prompts,
                               samples=cfg.rollout.samples_per_prompt, prompt_len=cfg.rollout.max_prompt_tokens // 4,
                               response_len=cfg.rollout.max_new_tokens)
    return plan
