"""Resolve a validated config into the trial's plan, and check that it fits, before launch.

One typed plan per trial: per role (rollout, teacher, learner, evaluator) the actor count, the
CPUs and GPUs each actor asks Ray for, the tensor-parallel size and the backend. `foresight plan`
prints it; `foresight run`, the trainer (`orchestrator/placement.py`) and the scheduler build
actors and placement groups from it and from nothing else, so what is printed is what runs.

- CPU scales (tiny): counts and backends from the config (defaults: 1 rollout, 1 teacher,
  2 ZeRO-3 ranks, HF backends), checked against the CPUs of the Ray cluster this process would use.
- GPU scales (1.5B-32B): counts and TP from the scale registry (`core/scales.py`), each
  overridable in the YAML (`rollout.num_workers`, `rollout.tensor_parallel`, ...), vLLM engines by
  default; every engine asks for TP GPUs in one bundle (one node), every learner rank for one GPU.
  Checked against the live Ray cluster's GPUs (`foresight run`), or without GPUs against a cluster
  spec (`foresight plan CONFIG --cluster 4x8xH100-80GB`, a dry run: memory per GPU, placement on
  the nodes, concurrent trials, reserved GPU-hours).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.config import ConfigError, ExperimentConfig
from core.methods import method_of
from core.cost_model import StepCost, Throughput
from core.scales import (FRAGMENTATION, GB, GPU_RESERVE_GB, GPU_TYPES, SCALES, ClusterSpec, Scale, concurrent_trials,
                         engine_mem_gb, first_fit, learner_host_terms, learner_mem_gb, scorer_mem_terms, usable_gb)
from orchestrator.balance import Costing, Layout, balance, candidates
from orchestrator.plan_checks import (check_backends, check_context, check_models, check_sandbox,  # noqa: F401
                                      longest_prompt, model_context, tokenizer_difference)
from orchestrator.plan_cost import cpu_cost, gpu_costing
from orchestrator.tracking import resolve_uri

ROLES = ("rollout", "teacher", "learner", "evaluator")


@dataclass(frozen=True)
class RoleSpec:
    """One actor group of a trial: `actors` actors, each asking Ray for `cpus` CPUs and `gpus` GPUs
    (in one placement-group bundle, hence on one node)."""

    role: str
    actors: int
    cpus: float
    gpus: int = 0
    tp: int = 1
    """Tensor-parallel size of each engine (its `gpus`); 1 for learner ranks and on CPU."""
    backend: str = "hf"
    """hf | vllm for engines, deepspeed for the learner."""
    mem_gb: float = 0.0
    """Predicted memory per GPU (GPU plans)."""
    note: str = ""
    share: float = 1.0
    """Share of each of its GPUs the actor asks Ray for: 0.5 for colocated rollout and teacher engines."""
    host: str = ""
    """The role whose bundles this role's actors sit in (a colocated teacher: `rollout`); "" for its own."""
    pool: str = ""
    """A shared teacher pool's name (`orchestrator/teacher_pool.py`): the actors are the pool's, outside
    the trial's placement group; "shared" until the sweep assigns the pool."""

    @property
    def own_bundles(self) -> bool:
        """Whether this role's actors have bundles of their own in the trial's placement group."""
        return not (self.host or self.pool)

    def bundle(self) -> dict[str, float]:
        return {"CPU": self.cpus, **({"GPU": float(self.gpus)} if self.gpus else {})}

    def options(self) -> dict[str, float]:
        """Ray actor options for one actor of this role."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus * self.share}


@dataclass
class ResolvedPlan:
    """Runtime values derived from the config (never written back into it)."""

    run_dir: Path
    tracking_uri: str
    scale: str = "tiny"
    roles: list[RoleSpec] = field(default_factory=list)
    available_cpus: float = 0.0
    available_gpus: float = 0.0
    cluster: ClusterSpec | None = None
    """GPU plans: the cluster the plan was checked against (a spec, or the live cluster's nodes)."""
    dry_run: bool = False
    nodes: list[int] = field(default_factory=list)
    """GPU plans: the node of each bundle in a first-fit placement (bundle order)."""
    concurrent: int = 1
    cost: StepCost | None = None
    steps: int = 0
    gradient_checkpointing: bool = False
    """The learner's, resolved (the config's, else on for GPU scales)."""
    weight_sync: str = "object_store"
    """object_store | nccl (NCCL needs CUDA in the actors; the trainer falls back when `auto` finds none)."""
    engine_util: dict[str, float] = field(default_factory=dict)
    """vLLM `gpu_memory_utilization` per engine role (GPU plans): rollout.gpu_memory_utilization, lowered
    where a model sits beside the engine on its GPUs (ExOPD's reference on the teacher's)."""
    host_gb: list[float] = field(default_factory=list)
    """GPU plans: predicted peak host memory per node (GB, node order), see `host_memory`."""
    layout: Layout | None = None
    """The counts the plan runs (GPU plans: chosen by `orchestrator/balance.py` unless pinned)."""
    layout_source: str = "config"
    """balanced (objective) | registry | config (CPU plans: the YAML's counts)."""
    registry: tuple[Layout, StepCost | None] | None = None
    """GPU plans: the scale registry's layout and its cost (None: it does not fit), printed beside."""
    throughput: Throughput | None = None
    """The cost model's constants: the device type's defaults or a calibration."""
    costing: Costing | None = None
    """What the plan's layouts cost with (for the comparisons `describe` prints)."""
    overlap_if_pipelined: float = 0.0
    """The overlap share this config's barriers leave at staleness >= 1."""
    notes: list[str] = field(default_factory=list)
    cross_tokenizer: bool = False
    """Student and teacher tokenizers differ: the teacher scores on the cross-tokenizer path."""
    teacher_pool: Any = None
    """The shared teacher pool this trial calls (`orchestrator.teacher_pool.PoolSpec`), else None."""
    route_pools: dict[str, Any] = field(default_factory=dict)
    """Multi-teacher runs: `models.teachers` name -> the pool serving it (`teacher_pool.route_pools`)."""

    # ------------------------------------------------------------------ queries
    def role(self, name: str) -> RoleSpec | None:
        return next((r for r in self.roles if r.role == name), None)

    def bundles(self) -> list[dict[str, float]]:
        """One bundle per actor, roles in plan order: the trial's placement group. A colocated role's
        actors sit in its host's bundles, whose CPUs include theirs."""
        out = []
        for r in self.roles:
            if not r.own_bundles:
                continue
            guests = [g for g in self.roles if g.host == r.role]
            for _ in range(r.actors):
                b = r.bundle()
                b["CPU"] += sum(g.cpus for g in guests)
                out.append(b)
        return out

    def first_bundle(self, name: str) -> int:
        at = 0
        spec = self.role(name)
        if spec is not None and spec.host:
            return self.first_bundle(spec.host)
        if spec is not None and spec.pool:
            raise KeyError(f"{name} is served by the shared pool {spec.pool}")
        for r in self.roles:
            if r.role == name:
                return at
            at += r.actors if r.own_bundles else 0
        raise KeyError(name)

    @property
    def gpu(self) -> bool:
        return any(r.gpus for r in self.roles)

    @property
    def total_cpus(self) -> float:
        """CPUs the trial's own actors ask for (a shared pool's are counted once, by the sweep)."""
        return sum(r.cpus * r.actors for r in self.roles if not r.pool)

    @property
    def total_gpus(self) -> int:
        return sum(r.gpus * r.actors for r in self.roles if r.own_bundles)

    @property
    def num_evaluators(self) -> int:
        ev = self.role("evaluator")
        return ev.actors if ev else 0

    @property
    def reserved_gpu_hours(self) -> float:
        """Reserved GPUs x wall time per step (serial, or the pipelined critical path) x steps."""
        return self.total_gpus * self.cost.step_seconds * self.steps / 3600 if self.cost else float("nan")

    @property
    def busy_gpu_hours(self) -> float:
        """GPU-seconds the roles work per step (`StepCost.busy`) x steps."""
        return sum(self.cost.busy().values()) * self.steps / 3600 if self.cost else float("nan")

    def params(self) -> dict[str, str]:
        """The plan as flat MLflow params: plan/<role>/{actors,gpus,tp,backend}."""
        out = {"plan/scale": self.scale, "plan/weight_sync": self.weight_sync, "plan/layout": self.layout_source,
               "plan/device": self.cluster.gpu if self.cluster else "cpu"}
        if self.layout is not None:
            out["plan/colocated"] = str(self.layout.colocated)
        if self.cross_tokenizer:
            out["plan/cross_tokenizer"] = "True"
        for r in self.roles:
            out.update({f"plan/{r.role}/actors": str(r.actors), f"plan/{r.role}/gpus": str(r.gpus),
                        f"plan/{r.role}/tp": str(r.tp), f"plan/{r.role}/backend": r.backend})
            if r.pool:
                out[f"plan/{r.role}/pool"] = r.pool
        return out

    # ------------------------------------------------------------------ printing
    def describe(self) -> str:
        lines = [f"run dir:       {self.run_dir}", f"mlflow:        {self.tracking_uri}"]
        if self.gpu:
            lines.append(f"scale {self.scale} on {self.cluster}: {self.total_gpus} GPUs per trial, "
                         f"{self.concurrent} trial(s) at once; layout {self.layout_source}")
        lines.append(f"  {'role':<10} {'actors':>6} {'CPU':>5} {'GPU':>4} {'TP':>3}  {'backend':<9} "
                     + ("GB/GPU  " if self.gpu else "") + "what")
        for r in self.roles:
            mem = f"{r.mem_gb:6.1f}  " if self.gpu else ""
            gpus = f"{r.gpus * r.share:g}" if r.share != 1 else str(r.gpus)
            pool = f" (shared pool {r.pool}: not in this trial's reservation)" if r.pool else ""
            lines.append(f"  {r.role:<10} {r.actors:>6} {r.cpus:>5g} {gpus:>4} {r.tp:>3}  {r.backend:<9} {mem}{r.note}{pool}")
        if self.gpu and self.nodes:
            per_node: dict[int, list[str]] = {}
            for r in self.roles:
                if not r.own_bundles:
                    continue
                guests = "".join(f"+{g.role}" for g in self.roles if g.host == r.role)
                first = self.first_bundle(r.role)
                for k in range(r.actors):
                    per_node.setdefault(self.nodes[first + k], []).append(f"{r.role}{guests}x{r.gpus}")
            for node in sorted(per_node):
                ram = f"  (host RAM ~{self.host_gb[node]:,.0f} GB)" if node < len(self.host_gb) else ""
                lines.append(f"  node {node}: {', '.join(per_node[node])}{ram}")
        if self.engine_util:
            lines.append("  vLLM gpu_memory_utilization: " + ", ".join(f"{k} {v:g}" for k, v in self.engine_util.items()))
        if self.cost:
            lines += self._describe_cost()
        elif self.gpu:
            lines.append("  GPU-hours: unknown GPU type on this cluster (no accelerator_type resource)")
        if self.gpu:
            lines.append(f"  weight sync: {self.weight_sync}")
        else:
            lines.append(f"total:         {self.total_cpus:g} of {self.available_cpus:g} CPUs")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _describe_cost(self) -> list[str]:
        c, unit = self.cost, ("GPU" if self.gpu else "CPU")
        parts = ", ".join(f"{k} {v:.3g}" for k, v in c.seconds.items())
        if c.overlap:
            produce = "rollout + teacher" if c.staleness <= 1 or c.colocated else "max(rollout, teacher)"
            loop = f"pipelined, staleness {c.staleness}, on {c.overlap:.0%} of steps: max({produce}, learner + sync)"
        else:
            loop = "strict loop"
        lines = [f"  cost model: {self.throughput.source if self.throughput else 'defaults'}",
                 f"  per step ({loop}): {c.step_seconds:.3g} s ({parts})"]
        shares = {r: b / (c.gpus[r] * c.step_seconds) for r, b in c.busy().items() if c.gpus.get(r) and c.step_seconds}
        lines.append(f"  busy share of each role's {unit}s: " + ", ".join(f"{r} {v:.0%}" for r, v in shares.items())
                     + f"; all {c.busy_share:.0%}")
        if self.gpu:
            lines.append(f"  learner: {c.padding:.3f} computed tokens per real token (micro-batches packed by "
                         "length and trimmed to their own width)")
            lines.append(f"  {self.steps} steps: ~{self.reserved_gpu_hours:,.0f} reserved GPU-hours ({self.total_gpus} GPUs "
                         f"x wall time), ~{self.busy_gpu_hours:,.0f} busy ({self.reserved_gpu_hours / self.busy_gpu_hours:.2f}x)")
            lines += self._comparison()
        return lines

    def _comparison(self) -> list[str]:
        """This layout and the registry's, in the strict loop and pipelined at staleness max(1, s)."""
        if self.costing is None or self.layout is None:
            return []
        s = max(1, self.costing.staleness)
        overlap = self.overlap_if_pipelined
        modes = {"strict": replace(self.costing, staleness=0, overlap=0.0),
                 f"staleness {s}": replace(self.costing, staleness=s, overlap=overlap)}
        rows = [("this plan", self.layout)]
        if self.registry is not None and self.registry[0] != self.layout:
            rows.append(("registry", self.registry[0]))
        out = [f"  {'':<48} {'':>4}" + "".join(f"  | {m:<27}" for m in modes),
               f"  {'layout':<48} {'GPUs':>4}" + "".join(f"  | {'s/step':>8} {'GPU-h':>7} {'res/busy':>9}" for _ in modes)]
        for name, lay in rows:
            cells = ""
            fits = name == "this plan" or self.registry[1] is not None
            for costing in modes.values():
                if not fits:
                    cells += f"  | {'(does not fit)':<27}"
                    continue
                cost = costing.cost(lay)
                reserved = cost.reserved_devices * cost.step_seconds
                cells += (f"  | {cost.step_seconds:>8.1f} {reserved * self.steps / 3600:>7,.0f} "
                          f"{reserved / max(sum(cost.busy().values()), 1e-9):>8.2f}x")
            out.append(f"  {name + ': ' + lay.describe():<48} {lay.gpus:>4}{cells}")
        return out


# ----------------------------------------------------------------------------- live cluster
def cluster_resources() -> dict[str, float]:
    """Resources of the Ray cluster this process uses or would use: the connected one, the job's
    ($RAY_ADDRESS), else this machine (the local Ray that `foresight run` starts)."""
    import ray

    if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR")
    if ray.is_initialized():
        return dict(ray.cluster_resources())
    local = {"CPU": float(os.cpu_count() or 1)}
    try:
        import torch

        if torch.cuda.is_available():
            local["GPU"] = float(torch.cuda.device_count())
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return local


def live_cluster(resources: dict[str, float]) -> ClusterSpec:
    """GPUs per alive node of the Ray cluster (or this machine) and their type when Ray knows it."""
    import ray

    node_gpus, kinds = [], set()
    if ray.is_initialized():
        for node in ray.nodes():
            res = node.get("Resources", {})
            if node.get("Alive") and res.get("GPU", 0) > 0:
                node_gpus.append(int(res["GPU"]))
                kinds |= {k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")}
    elif resources.get("GPU"):
        node_gpus = [int(resources["GPU"])]
    kind = next(iter(kinds)) if len(kinds) == 1 else "unknown"
    mem = GPU_TYPES[kind].mem_gb if kind in GPU_TYPES else 0.0
    return ClusterSpec(len(node_gpus), max(node_gpus, default=0), kind, mem, tuple(node_gpus))


# ----------------------------------------------------------------------------- resolve
def resolve(cfg: ExperimentConfig, file: str | Path | None = None, cpus: float | None = None,
            cluster: ClusterSpec | None = None, resources: dict[str, float] | None = None) -> ResolvedPlan:
    """The trial's plan; raises ConfigError (file, key, reason) when it cannot run.

    `cluster` (GPU scales): a dry run against that spec; model paths are not checked (they live on
    the cluster). Otherwise the plan is checked against `resources` (default: the live cluster's,
    or `cpus` CPUs)."""
    scale = SCALES[cfg.run.scale]
    plan = ResolvedPlan(run_dir=cfg.run_dir, tracking_uri=resolve_uri(cfg.tracking.uri, cfg.run.output_dir),
                        scale=scale.name, steps=cfg.run.steps, dry_run=cluster is not None and scale.gpu)
    gc = cfg.learner.gradient_checkpointing
    plan.gradient_checkpointing = scale.gpu if gc is None else gc
    if not scale.gpu:
        _check_cpu_only(cfg, file)
        cluster = None
    if resources is None:
        resources = {"CPU": cpus} if cpus is not None else ({} if plan.dry_run else cluster_resources())
    plan.available_cpus, plan.available_gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if scale.gpu:
        if cluster is None:
            if plan.available_gpus < 1:
                raise ConfigError(file, "run.scale", f"scale {scale.name} needs GPUs and this Ray cluster has "
                                  f"{plan.available_gpus:g}; check the plan without GPUs with "
                                  "`foresight plan CONFIG --cluster 4x8xH100-80GB`")
            cluster = live_cluster(resources)
        _gpu_roles(cfg, scale, plan, cluster, file)
    else:
        _cpu_roles(cfg, plan, file)
        cpu_cost(cfg, plan, file)
    _check_combinations(cfg, plan, file)
    if not plan.dry_run:
        from core.config import check_paths

        check_paths(cfg, file)
        check_backends(cfg, plan, file)
        why = check_models(cfg, file)
        if why:
            plan.cross_tokenizer = True
            plan.notes.append(f"cross-tokenizer OPD: {why}; the teacher scores the response text in its own tokens, "
                              "aligned to the student's by bytes (actors/cross_teacher.py)")
        check_sandbox(cfg, file)
    else:
        check_context(cfg, file, {"models.student": (scale.student.name, scale.student.context),
                                  "models.teacher": (scale.teacher.name, scale.teacher.context)})
    return plan


def shares_teacher(cfg: ExperimentConfig) -> bool:
    """`teacher.shared`, for a trial whose teacher only scores (an off-policy control's teacher samples
    with the trial's own rollout settings, so it keeps its own)."""
    return cfg.teacher.shared and cfg.rollout.source == "student"


def _check_cpu_only(cfg: ExperimentConfig, file) -> None:
    for key, value in (("rollout.tensor_parallel", cfg.rollout.tensor_parallel),
                       ("teacher.tensor_parallel", cfg.teacher.tensor_parallel)):
        if value and value > 1:
            raise ConfigError(file, key, f"tensor parallelism splits an engine over GPUs; scale {cfg.run.scale} "
                                         "runs on CPUs (use a GPU scale or leave it unset)")


def _counts(cfg: ExperimentConfig, scale: Scale) -> dict[str, tuple[int, int, str]]:
    """(actors, TP, backend) per engine role and the learner: the config's where set, else the scale's."""
    engine = "vllm" if scale.gpu else "hf"
    gpu = scale.gpu
    return {
        "rollout": (cfg.rollout.num_workers or scale.rollout_engines,
                    cfg.rollout.tensor_parallel or (scale.rollout_tp if gpu else 1), cfg.rollout.backend or engine),
        "teacher": (cfg.teacher.num_workers or scale.teacher_replicas,
                    cfg.teacher.tensor_parallel or (scale.teacher_tp if gpu else 1), cfg.teacher.backend or engine),
        "learner": (cfg.learner.world_size or scale.learner_ranks, 1, "deepspeed"),
    }


ROLE_NOTES = {
    ("rollout", "hf"): "student sampling (HF generate)",
    ("rollout", "vllm"): "student sampling (vLLM engine)",
    ("teacher", "hf"): "teacher log-probs (HF forward)",
    ("teacher", "vllm"): "teacher log-probs (vLLM prompt log-probs)",
    ("learner", "deepspeed"): "DeepSpeed ZeRO-3 ranks",
}


def _cpu_roles(cfg: ExperimentConfig, plan: ResolvedPlan, file) -> None:
    counts = _counts(cfg, SCALES[cfg.run.scale])
    cpus = {"rollout": cfg.rollout.num_cpus, "teacher": cfg.teacher.num_cpus, "learner": cfg.learner.num_cpus_per_rank}
    for role, (n, tp, backend) in counts.items():
        note = ROLE_NOTES[(role, backend)] + (" (gloo)" if role == "learner" else "")
        pool = "shared" if role == "teacher" and shares_teacher(cfg) else ""
        plan.roles.append(RoleSpec(role, n, cpus[role], 0, tp, backend, note=note, pool=pool))
    method = method_of(cfg.method)
    if method.evaluators == "dedicated":
        pool = plan.role("teacher")  # a shared pool takes at least this trial's share of the CPUs too
        free = plan.available_cpus - plan.total_cpus - (pool.cpus * pool.actors if pool.pool else 0)
        n = method.cfg.num_evaluators or auto_evaluators(free, method.cfg.evaluator_cpus, method.candidates)
        plan.roles.append(RoleSpec("evaluator", n, method.cfg.evaluator_cpus, 0, 1, counts["rollout"][2],
                                   note=f"EffOPD candidate scoring, {method.candidates} candidates"))
    ws = counts["learner"][0]
    if ws > plan.available_cpus:
        raise ConfigError(file, "learner.world_size", f"{ws} ranks but the Ray cluster has {plan.available_cpus:g} CPUs")
    if plan.total_cpus > plan.available_cpus + 1e-9:
        raise ConfigError(file, "learner.num_cpus_per_rank",
                          f"the plan needs {plan.total_cpus:g} CPUs ({', '.join(f'{r.role} {r.cpus * r.actors:g}' for r in plan.roles)}) "
                          f"but the Ray cluster has {plan.available_cpus:g}")


def _role_memory(cfg: ExperimentConfig, scale: Scale, plan: ResolvedPlan, role: str, n: int, tp: int,
                 backend: str) -> tuple[float, float]:
    """(GB per GPU, GB of it outside a vLLM engine's `gpu_memory_utilization`) for one actor of `role`."""
    rc, T = cfg.rollout, cfg.learner.max_tokens_per_gpu
    seq_len = rc.max_prompt_tokens + rc.max_new_tokens
    shape = scale.teacher if role == "teacher" else scale.student
    method = method_of(cfg.method)
    if role == "learner":
        return learner_mem_gb(scale.student, n, T, method.extrapolates, checkpointing=plan.gradient_checkpointing), 0.0
    if backend == "vllm":
        engine = engine_mem_gb(shape, tp, seq_len)
    elif role == "teacher":
        engine = sum(scorer_mem_terms(shape, tokens=T, chunk=cfg.learner.logit_chunk_tokens).values()) / GB
    else:  # HF generate on one GPU: the batch's share, every sampled step's logits
        batch = -(-rc.batch_prompts * rc.samples_per_prompt // max(n, 1)) if role == "rollout" else method.val_size
        engine = engine_mem_gb(shape, 1, seq_len, batch=batch, sampled=rc.max_new_tokens)
    extra = 0.0
    if role == "teacher" and method.uses_reference:  # pi_ref beside the teacher, split over its GPUs
        extra += sum(scorer_mem_terms(scale.student, tokens=T, chunk=cfg.learner.logit_chunk_tokens, shards=tp).values()) / GB
    if role in ("evaluator", "rollout") and backend == "hf" and method.val_score == "teacher_kl":
        extra += sum(scorer_mem_terms(scale.teacher, tokens=T, chunk=cfg.learner.logit_chunk_tokens).values()) / GB
    return engine + extra, extra if backend == "vllm" else 0.0


@dataclass
class MemoryCheck:
    """A layout's memory per GPU: (GB, GB outside a vLLM engine) per role, each vLLM role's
    `gpu_memory_utilization`, and what does not fit."""

    mem: dict[str, tuple[float, float]] = field(default_factory=dict)
    util: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_memory(cfg: ExperimentConfig, scale: Scale, plan: ResolvedPlan, layout: Layout, cluster: ClusterSpec,
                 backends: dict[str, str]) -> MemoryCheck:
    """Each role's memory per GPU under `layout` against the cluster's GPUs. A vLLM engine gets
    `rollout.gpu_memory_utilization` of each GPU less what sits beside it (ExOPD's reference);
    colocated rollout and teacher engines split that share: the teacher 1.5x its minimum (weights
    and one sequence's KV: room to batch), the rollout engine the rest (its KV cache)."""
    out = MemoryCheck()
    usable, mem_gb = usable_gb(cluster.gpu_mem_gb), cluster.gpu_mem_gb
    tps = {"rollout": layout.rollout_tp, "teacher": layout.teacher_tp, "learner": 1, "evaluator": layout.evaluator_tp}
    counts = {"rollout": layout.rollout, "teacher": layout.teacher, "learner": layout.learner, "evaluator": layout.evaluators}
    for role, n in counts.items():
        if n:
            out.mem[role] = _role_memory(cfg, scale, plan, role, n, tps[role], backends[role])
    for role, (gb, outside) in out.mem.items():
        tp = tps[role]
        model = scale.teacher.name if role == "teacher" else scale.student.name
        if tp > cluster.gpus_per_node:
            out.errors.append(f"{role}: tensor parallel {tp} > {cluster.gpus_per_node} GPUs per node")
        if backends[role] == "hf" and tp > 1:
            out.errors.append(f"{role}: backend hf runs on one GPU; tensor parallel {tp} needs backend vllm")
        if not mem_gb or (layout.colocated and role in ("rollout", "teacher")):
            continue
        if backends[role] == "vllm":  # the engine within its share; what sits beside it within the rest
            util = min(cfg.rollout.gpu_memory_utilization, (usable - outside) / mem_gb)
            out.util[role] = round(util, 3)
            if gb - outside > util * mem_gb:
                out.errors.append(f"{role}: its engine needs {gb - outside:.1f} GB per GPU, {util * mem_gb:.1f} GB "
                                  f"available at gpu_memory_utilization {util:.2f} ({model}, TP {tp})")
            elif util < cfg.rollout.gpu_memory_utilization:
                out.notes.append(f"{role}: vLLM gpu_memory_utilization {util:.2f} (of {cfg.rollout.gpu_memory_utilization}) "
                                 f"leaves {outside:.1f} GB per GPU for ExOPD's reference model beside it")
        elif gb > usable:
            out.errors.append(f"{role}: needs {gb:.1f} GB per GPU, {usable:.1f} GB usable of {mem_gb:g} ({model}, TP {tp}, "
                              f"backend {backends[role]}; {FRAGMENTATION:.0%} fragmentation and {GPU_RESERVE_GB:g} GB "
                              "of CUDA/NCCL context kept free)")
    if layout.colocated and mem_gb:
        (r_gb, r_out), (t_gb, t_out) = out.mem["rollout"], out.mem["teacher"]
        if "vllm" in (backends["rollout"], backends["teacher"]):
            total = min(cfg.rollout.gpu_memory_utilization, (usable - r_out - t_out) / mem_gb)
            t_util = min(1.5 * (t_gb - t_out), total * mem_gb - (r_gb - r_out)) / mem_gb
            out.util.update(rollout=round(total - t_util, 3), teacher=round(t_util, 3))
            if (r_gb - r_out) + (t_gb - t_out) > total * mem_gb:
                out.errors.append(f"rollout + teacher on one GPU: their engines need {r_gb - r_out + t_gb - t_out:.1f} GB, "
                                  f"{total * mem_gb:.1f} GB available at gpu_memory_utilization {total:.2f}")
        elif r_gb + t_gb > usable:
            out.errors.append(f"rollout + teacher on one GPU: {r_gb + t_gb:.1f} GB, {usable:.1f} GB usable")
    return out


def _backends(cfg: ExperimentConfig, scale: Scale) -> dict[str, str]:
    engine = "vllm" if scale.gpu else "hf"
    rollout = cfg.rollout.backend or engine
    return {"rollout": rollout, "teacher": cfg.teacher.backend or engine, "learner": "deepspeed", "evaluator": rollout}


def _registry_layout(cfg: ExperimentConfig, scale: Scale, cluster: ClusterSpec) -> Layout:
    """The scale's row, with the YAML's pinned counts; evaluators: pinned, else what the spare GPUs allow."""
    counts = _counts(cfg, scale)
    method = method_of(cfg.method)
    lay = Layout(counts["rollout"][0], counts["teacher"][0], counts["learner"][0], 0, counts["rollout"][1],
                 counts["teacher"][1], scale.evaluator_tp if scale.gpu else 1)
    if method.evaluators == "dedicated":
        spare = cluster.gpus - lay.gpus if scale.gpu else 0
        n = method.cfg.num_evaluators or auto_evaluators(spare, lay.evaluator_tp, method.candidates)
        lay = Layout(lay.rollout, lay.teacher, lay.learner, n, lay.rollout_tp, lay.teacher_tp, lay.evaluator_tp)
    return lay


def _choose_layout(cfg: ExperimentConfig, scale: Scale, plan: ResolvedPlan, cluster: ClusterSpec,
                   backends: dict[str, str], costing: Costing | None) -> Layout:
    """The registry's layout, or with `plan.layout: balanced` and a cost model the best one found."""
    registry = _registry_layout(cfg, scale, cluster)
    places = lambda lay: first_fit(lay.bundles(), cluster.per_node) is not None  # noqa: E731
    fits = lambda lay: not check_memory(cfg, scale, plan, lay, cluster, backends).errors  # noqa: E731
    if costing is not None:
        plan.registry = (registry, costing.cost(registry) if fits(registry) and places(registry) else None)
    if costing is None or cfg.plan.layout == "registry":
        plan.layout_source = "registry" if costing is not None or cfg.plan.layout == "registry" else "registry (no cost model)"
        return replace(registry, pooled=shares_teacher(cfg))
    method = method_of(cfg.method)
    pooled = shares_teacher(cfg)
    pinned = {"rollout": cfg.rollout.num_workers, "learner": cfg.learner.world_size,
              "teacher": cfg.teacher.num_workers or (registry.teacher if pooled else None),
              "evaluator": method.cfg.num_evaluators if method.evaluators == "dedicated" else None}
    tps = {"rollout": registry.rollout_tp, "teacher": registry.teacher_tp, "evaluator": registry.evaluator_tp}
    room = cluster.gpus - (pinned["teacher"] * registry.teacher_tp if pooled else 0)  # the pool's GPUs are not the trial's
    layouts = candidates(pinned, tps, room, evaluators=method.evaluators == "dedicated",
                         max_evaluators=method.candidates + 1, colocate="none" if pooled else cfg.plan.colocate)
    if pooled:  # the trial's share of the pool: the registry's replicas (or the pinned count), on no GPUs of its own
        layouts = (replace(lay, pooled=True) for lay in layouts)
    best = balance(costing, layouts, fits, places, cfg.plan.objective)
    if best is None:
        plan.notes.append("no balanced layout fits this cluster; the registry's is checked instead")
        plan.layout_source = "registry"
        return replace(registry, pooled=pooled)
    plan.layout_source = f"balanced ({cfg.plan.objective})"
    return best[0]


def _gpu_roles(cfg: ExperimentConfig, scale: Scale, plan: ResolvedPlan, cluster: ClusterSpec, file) -> None:
    plan.cluster = cluster
    backends = _backends(cfg, scale)
    costing = plan.costing = gpu_costing(cfg, scale, plan, cluster, backends, file) if cluster.gpu_type else None
    layout = plan.layout = _choose_layout(cfg, scale, plan, cluster, backends, costing)
    memory = check_memory(cfg, scale, plan, layout, cluster, backends)
    _add_roles(cfg, plan, layout, backends, memory)
    method = method_of(cfg.method)
    errors, plan.engine_util = list(memory.errors), memory.util
    plan.notes += memory.notes
    if not cluster.gpu_mem_gb:
        plan.notes.append("GPU memory unknown on this cluster: memory per GPU not checked")
    nodes = first_fit(layout.bundles(), cluster.per_node)
    if nodes is None and not errors:
        lean = replace(layout, evaluators=0)
        pool = "an evaluator pool with no spare GPUs: " if layout.evaluators and first_fit(lean.bundles(), cluster.per_node) else ""
        errors.append(f"{pool}the trial needs {plan.total_gpus} GPUs, the cluster has {cluster.gpus} ({cluster})")
    if errors:
        raise ConfigError(file, "run.scale", f"{scale.name} on {cluster}: " + "; ".join(errors))
    plan.nodes = nodes or []
    plan.concurrent = concurrent_trials(layout.bundles(), cluster)
    _check_shared_output(cfg, plan, file)
    plan.host_gb = host_memory(cfg, scale, plan)
    if method.evaluators == "dedicated":  # the other evaluator mode, for comparison
        lean = replace(layout, evaluators=0).bundles()
        plan.notes.append(f"method.evaluators=borrowed: {sum(lean)} GPUs per trial, {concurrent_trials(lean, cluster)} "
                          "trial(s) at once (the rollout engines score the candidates while the loop waits)")
    elif method.evaluators == "borrowed":
        plan.notes.append("method.evaluators=borrowed: the rollout engines score the candidates (no evaluator GPUs)")
    wanted = cfg.learner.weight_sync
    plan.weight_sync = "nccl" if wanted == "nccl" or (wanted == "auto" and backends["rollout"] == "vllm") else "object_store"
    if costing is not None:
        plan.cost = costing.cost(layout)


def _add_roles(cfg: ExperimentConfig, plan: ResolvedPlan, layout: Layout, backends: dict[str, str],
               memory: MemoryCheck) -> None:
    """The plan's RoleSpecs for `layout` (GPU plans)."""
    method = method_of(cfg.method)
    share = 0.5 if layout.colocated else 1.0
    spec = {"rollout": (layout.rollout, layout.rollout_tp, cfg.rollout.num_cpus, share, ""),
            "teacher": (layout.teacher, layout.teacher_tp, cfg.teacher.num_cpus, share, "rollout" if layout.colocated else ""),
            "learner": (layout.learner, 1, cfg.learner.num_cpus_per_rank, 1.0, "")}
    if layout.evaluators:
        spec["evaluator"] = (layout.evaluators, layout.evaluator_tp, method.cfg.evaluator_cpus, 1.0, "")
    for role, (n, tp, cpus, frac, host) in spec.items():
        backend = backends[role]
        note = ROLE_NOTES.get((role, backend), f"EffOPD candidate scoring, {method.candidates} candidates")
        if host:
            note += f" (on the {host} GPUs)"
        pool = "shared" if role == "teacher" and layout.pooled else ""
        plan.roles.append(RoleSpec(role, n, cpus, tp, tp, backend, memory.mem.get(role, (0.0, 0.0))[0], note, frac, host, pool))


def host_memory(cfg: ExperimentConfig, scale: Scale, plan: ResolvedPlan) -> list[float]:
    """Peak host GB per node: every actor's process, each learner rank's loading (it reads only the rows
    of its own partitions: `actors/shards.py`), and on learner rank 0's node its publishing bucket and
    the object store's weights: each published version (object-store weight sync or the weights the
    evaluators and the final save read) and, in an EffOPD search, one candidate per evaluator at a time."""
    from core.scales import DTYPE_BYTES, HOST_PROCESS_GB

    if not plan.nodes:
        return []
    host = [0.0] * (max(plan.nodes) + 1)
    model = DTYPE_BYTES["bf16"] * scale.student.params_b
    for r in plan.roles:
        if r.pool:
            continue
        first = plan.first_bundle(r.role)
        for k in range(r.actors):
            node = plan.nodes[first + k]
            if r.role == "learner":
                host[node] += sum(learner_host_terms(scale.student, r.actors, bucket_mb=cfg.learner.sync_bucket_mb,
                                                     rank0=k == 0).values()) / GB
                if k == 0:
                    pool = plan.num_evaluators or plan.role("rollout").actors
                    host[node] += model * (1 + (pool if method_of(cfg.method).candidates else 0))
            else:
                host[node] += HOST_PROCESS_GB["engine"]
    return [round(h, 1) for h in host]


def _check_shared_output(cfg: ExperimentConfig, plan: ResolvedPlan, file) -> None:
    """A trial on more than one node needs `run.output_dir` to be one folder every node mounts: learner
    ranks write their ZeRO-3 shards and the final weights there, and the driver commits and resumes
    from it. A relative path resolves on each node (under each node's copy of the job's working dir):
    refused before launch (noted in a dry run); at launch every rank must read a marker the driver
    wrote there (`orchestrator.placement.check_shared_output`)."""
    if len(set(plan.nodes)) < 2 or cfg.run.output_dir.is_absolute():
        return
    why = (f"this plan spans {len(set(plan.nodes))} nodes and run.output_dir '{cfg.run.output_dir}' is relative: "
           "set an absolute path on a file system every node mounts (shards, checkpoints and final weights go there)")
    if plan.dry_run:
        plan.notes.append(why)
    else:
        raise ConfigError(file, "run.output_dir", why)


def _check_combinations(cfg: ExperimentConfig, plan: ResolvedPlan, file) -> None:
    """Checks that need resolved values (world size, backends, devices)."""
    if cfg.rollout.source == "teacher" and cfg.loss.importance_correction is None:
        plan.notes.append("rollout.source=teacher (the off-policy control): importance correction off "
                          "(min(pi_s / pi_teacher, threshold) would pull it back toward on-policy); "
                          "set loss.importance_correction to override")
    ws = plan.role("learner").actors
    total = cfg.rollout.batch_prompts * cfg.rollout.samples_per_prompt
    if total < ws:
        raise ConfigError(file, "learner.world_size", f"rollout.batch_prompts*samples_per_prompt={total} is smaller "
                                                      f"than the {ws} learner ranks: some ranks would get no data")
    rollout, teacher = plan.role("rollout"), plan.role("teacher")
    if cfg.learner.weight_sync == "nccl":
        if rollout.backend != "vllm":
            raise ConfigError(file, "learner.weight_sync", "nccl sends weights into vLLM engines; set rollout.backend=vllm")
        if not plan.gpu:
            raise ConfigError(file, "learner.weight_sync", "nccl broadcasts between CUDA GPUs and this plan runs on "
                                                           "CPUs; use auto or object_store")
    if teacher.backend == "vllm" and cfg.loss.type in ("full_reverse_kl", "forward_kl") and not cfg.loss.teacher_topk:
        raise ConfigError(file, "loss.teacher_topk", f"loss.type={cfg.loss.type} with teacher.backend=vllm needs the "
                                                     "teacher's top-k log-probs (set loss.teacher_topk, e.g. 64; vLLM "
                                                     "does not return the full distribution)")
    method_of(cfg.method).check(cfg, plan, file)


def auto_evaluators(free: float, per_evaluator: float, candidates: int) -> int:
    """min(5, candidates + 1, what the free resources allow), at least 1."""
    fit = int(free // per_evaluator + 1e-9) if per_evaluator > 0 else candidates + 1
    return max(1, min(5, candidates + 1, fit))


