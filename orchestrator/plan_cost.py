"""What a trial's layouts cost (`orchestrator/balance.py::Costing`), from its config, the models'
shapes, the device and the cost model's constants (the device type's defaults or a calibration)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from core.calibration import Calibration
from core.config import ConfigError, ExperimentConfig
from core.cost_model import CPU_THREAD, Device, Model, Throughput, Workload, defaults
from core.methods import method_of
from core.scales import GB, ClusterSpec, ModelShape, Scale, engine_mem_gb, shape_of
from orchestrator.balance import Costing, Layout
from orchestrator.plan_checks import longest_prompt

if TYPE_CHECKING:
    from orchestrator.plan import ResolvedPlan


def throughput_of(cfg: ExperimentConfig, device: str, file) -> tuple[Throughput, Calibration | None]:
    """The cost model's constants: `plan.calibration`'s fit, else the device type's defaults."""
    if cfg.plan.calibration is None:
        return defaults(device), None
    try:
        cal = Calibration.load(cfg.plan.calibration)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(file, "plan.calibration", f"{cfg.plan.calibration}: not a calibration ({err}); "
                          "make one with `foresight plan CONFIG --calibrate RUN_DIR`") from None
    if cal.device != device:
        raise ConfigError(file, "plan.calibration", f"{cfg.plan.calibration} was measured on {cal.device}; this plan "
                          f"runs on {device}")
    return cal.throughput, cal


def costing_for(cfg: ExperimentConfig, student: ModelShape, teacher: ModelShape, device: Device, thr: Throughput,
                backends: dict[str, str], *, weight_bytes: int, cal: Calibration | None, checkpointing: bool,
                cores: float = float("inf"), notes: list[str] | None = None) -> Costing:
    """What every layout of this config costs with (`orchestrator/balance.py`): the step's workload
    (a calibration's measured fill and prompt length, else half the response cap and a quarter of
    the prompt cap, or the embedded task's exact prompt), evaluation, the EffOPD search's share of steps, the pipeline's overlap."""
    from orchestrator.pipeline import overlap_share

    rc = cfg.rollout
    from core.config import AdditionTask

    guess = longest_prompt(cfg) if isinstance(cfg.task, AdditionTask) else rc.max_prompt_tokens // 4
    fill, prompt = (cal.fill, round(cal.prompt_len)) if cal else (0.5, guess)
    wl = lambda n: Workload(n, prompt, rc.max_new_tokens, fill)  # noqa: E731
    method = method_of(cfg.method)
    steps = min(cfg.run.steps, 100_000)
    sequences = eval_set_sequences(cfg, notes if notes is not None else [])
    model = lambda m: Model(m.params_b * 1e9, weight_bytes, m.kv_bytes_per_token() * weight_bytes / 2)  # noqa: E731
    mem, seq_len = device.mem_gb, rc.max_prompt_tokens + rc.max_new_tokens

    def kv_tokens(layout: Layout) -> float:
        """KV-cache tokens of one vLLM rollout engine: its memory share less weights and ~1 GB of activations."""
        if backends["rollout"] != "vllm" or not mem:
            return float("inf")
        gb = rc.gpu_memory_utilization * mem - weight_bytes * student.params_b / layout.rollout_tp - 1.0
        if layout.colocated:
            gb -= 1.5 * engine_mem_gb(teacher, 1, seq_len)
        return max(gb, 0.0) * GB * layout.rollout_tp / student.kv_bytes_per_token()

    return Costing(student=model(student), teacher=model(teacher), device=device, thr=thr,
                   work=wl(rc.batch_prompts * rc.samples_per_prompt), eval_work=wl(cfg.eval.num_examples or 512),
                   eval_every=cfg.eval.every, sets_work=wl(sequences) if sequences else None,
                   val_work=wl(method.val_size) if method.candidates else None, candidates=method.candidates,
                   searches_per_step=sum(method.searches_at(s) for s in range(1, steps + 1)) / steps,
                   max_tokens=cfg.learner.max_tokens_per_gpu, checkpointing=checkpointing,
                   rollout_backend=backends["rollout"], teacher_backend=backends["teacher"],
                   staleness=cfg.pipeline.max_staleness, overlap=overlap_share(cfg), cores=cores, kv_tokens=kv_tokens)


def gpu_costing(cfg: ExperimentConfig, scale: Scale, plan: ResolvedPlan, cluster: ClusterSpec,
             backends: dict[str, str], file) -> Costing:
    gpu = cluster.gpu_type
    from orchestrator.pipeline import overlap_share

    thr, cal = throughput_of(cfg, cluster.gpu, file)
    plan.throughput, plan.overlap_if_pipelined = thr, overlap_share(cfg, pipelined=True)
    return costing_for(cfg, scale.student, scale.teacher, Device(gpu.peak_flops, gpu.hbm_bytes_per_s, cluster.gpu_mem_gb),
                       thr, backends, weight_bytes=2, cal=cal, checkpointing=plan.gradient_checkpointing, notes=plan.notes)


def cpu_cost(cfg: ExperimentConfig, plan: ResolvedPlan, file) -> None:
    """CPU plans: the step's cost on one-thread actors from the model folders' shapes (none when a
    folder has no config.json yet: `check_paths` says so next)."""
    student, teacher = cfg.model_paths
    try:
        shapes = shape_of(student), shape_of(teacher)
    except (OSError, ValueError, KeyError, TypeError):  # no checkpoint yet, or one without the usual keys
        return
    thr, cal = throughput_of(cfg, "cpu", file)
    plan.throughput = thr
    lay = Layout(*(plan.role(r).actors for r in ("rollout", "teacher", "learner")), evaluators=plan.num_evaluators,
                 pooled=bool(plan.role("teacher").pool))
    backends = {r.role: r.backend for r in plan.roles}
    backends.setdefault("evaluator", backends["rollout"])
    plan.layout = lay
    costing = costing_for(cfg, *shapes, CPU_THREAD, thr, backends, weight_bytes=4, cal=cal,
                          checkpointing=plan.gradient_checkpointing, cores=plan.available_cpus or 1.0, notes=plan.notes)
    plan.cost = costing.cost(lay)
    plan.costing = costing


def eval_set_sequences(cfg: ExperimentConfig, notes: list[str]) -> int:
    """Sequences one evaluation of the named sets decodes: per prompt one greedy and k samples; the
    prompt count is `num_examples`, else the file's rows (a file not on this machine counts 0, noted)."""
    total = 0
    for name, es in cfg.eval.sets.items():
        n = es.num_examples or count_rows(es.path)
        if n is None:
            notes.append(f"eval.sets.{name}: {es.path} is not here; its sampling is not in the GPU-hours")
            continue
        total += n * (int(es.greedy) + es.k)
    return total


def count_rows(path: Path) -> int | None:
    """Records in a `.parquet` (from its footer) or `.jsonl` file; None when the file is absent."""
    if not path.is_file():
        return None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open() as f:
        return sum(1 for line in f if line.strip())
