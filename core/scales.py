"""Scale registry, GPU types, memory formulas and placement: all checkable without GPUs (the cost
model is `core/cost_model.py`).

`SCALES` is a plain dict. GPU scales follow the papers (Qwen3 / Qwen2.5 students; the teacher is
a larger or RL-tuned model of the same family); their checkpoints are local folders under
`$FORESIGHT_MODEL_ROOT` (default /models), never downloaded. The tiny scale is the embedded
CPU task. A scale gives each role its default actor count and tensor-parallel size; the YAML can
override every one of them (`orchestrator/plan.py` resolves the trial's plan).

Memory per GPU (GB = 1e9 bytes; `learner_mem_phases`, `engine_mem_terms`, `evaluator_mem_terms`), Psi =
parameters, N = ZeRO-3 ranks, TP = tensor parallel, w = bytes of the working dtype (bf16 2 on GPU, fp32 4
on CPU), T = the learner's tokens per micro-batch per GPU (`learner.max_tokens_per_gpu`, the papers:
22,000), s = min(Psi / N, 1e9) (DeepSpeed's optimizer sub-group). Measured on CPU (fp32) by
`benchmarks/memory_model.py`: within 25% per role, `benchmarks/results/memory_model.json`.
- learner, DeepSpeed ZeRO-3 with fp32 master weights and Adam (the peak of three phases):
  states  (w + 16) Psi / N: working weight partitions (w), gradient partitions (4: micro-batch
          gradients accumulate in fp32, `grad_accum_dtype`), fp32 master (4), Adam m and v (8): 18 Psi / N
          in bf16, 20 in fp32; + (4 + w) Psi / N for EffOPD: its fp32 anchor and the last search's
          direction in the working dtype (partition-local); + the reduce
          bucket, w min(5e8, Psi) (DeepSpeed's `reduce_bucket_size`, 1 GB in bf16).
  + the larger of
  backward  gathered parameters, w min(Psi, 1e9) (ZeRO-3 keeps them from forward to backward, up to
            `stage3_max_live_parameters`; at N = 1 a gathered parameter is its partition: w V h, the
            largest module's full gradient), plus
            with gradient checkpointing: L T h w (each layer's input) + max(one layer recomputed,
            T a w, the logits chunk); without: L T a w + the logits chunk. a w = bytes per token one
            layer saves, (8 h + 2 kv d + 4 I) w + 2 h (4 - w) (RMSNorm's fp32 upcast in bf16), I the
            MLP width (estimated from Psi, `intermediate_size`).
            logits chunk: min(chunk, response tokens) V (12 + 4 - w) (logits, fp32 copy, log-softmax
            and its gradient; `learner.logit_chunk_tokens`, default 2048).
  optimizer step  4 s (the fp32 gradient of one sub-group) + max(w s if w < 4 (its bf16 flat copy),
            8 s for torch AdamW on CPU (two fp32 temporaries); fused Adam on GPU has none).
  setup   max(w V h (the largest module, built whole under `zero.Init` before it is partitioned; each
          rank then loads only its partitions from the checkpoint), (w + 8) Psi / N + 4 s (working,
          gradient, master partitions and the first fp32 gradient buffer)).
  On the host (`learner_host_terms`): the process, its partitions while they are loaded (w Psi / N)
  and one tensor's rows at a time; rank 0 also one weight bucket while publishing.
- vLLM engine (rollout, teacher scoring, evaluator): 2 Psi / TP weights + KV cache for at least one
  full sequence: S * 2 * L * kv_heads * head_dim * 2 / TP, within `gpu_memory_utilization` of the GPU.
  HF rollout worker (on its GPU in bf16, or the CPU in fp32): w Psi + KV of the batch + B R V 4 (HF
  `generate` keeps every sampled step's fp32 logits; the log-probs are taken one step at a time).
- HF scoring (teacher, ExOPD's reference beside it, `teacher_kl`): w Psi + one micro-batch's forward
  without grad (T (h + I) w, the widest layer's activations, + T h w hidden states) + the logits chunk
  (min(chunk, T) V 12: logits, log-softmax, top-k). The reference on a vLLM teacher's GPUs is split
  over them (weights / TP) and sits outside the engine's `gpu_memory_utilization`.
- HF evaluator (CPU): 4 Psi + one bucket of the candidate the learner formed (a bucket is at most
  `sync_bucket_mb` + the largest tensor) + greedy decoding of D_v.
- An HF model loaded in a dtype other than its checkpoint's (fp32 on CPU from a bf16 checkpoint) peaks
  at load: its weights + the largest tensor as read (`conversion_bytes`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    name: str
    params_b: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int = 151_936
    context: int = 32_768
    """max_position_embeddings: the longest prompt + response the model takes (Qwen2.5 32k, Qwen3 40k)."""
    intermediate: float | None = None
    """MLP width when known (None: estimated from the parameter count, `intermediate_size`)."""

    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16


@dataclass(frozen=True)
class Scale:
    """Defaults of one model scale: models and, per role, actor count and tensor-parallel size."""

    name: str
    student: ModelShape
    teacher: ModelShape
    rollout_engines: int
    rollout_tp: int
    teacher_replicas: int
    teacher_tp: int
    learner_ranks: int
    evaluators: int
    evaluator_tp: int = 1
    gpu: bool = True

    def model_path(self, role: str) -> Path:
        """Default local checkpoint of the student or teacher of this scale."""
        if not self.gpu:
            return Path("models/addition") / role
        shape = self.student if role == "student" else self.teacher
        return Path(os.environ.get("FORESIGHT_MODEL_ROOT", "/models")) / shape.name


QWEN3_4B = ModelShape("Qwen3-4B", 4.0, 36, 2560, 8, 128, context=40_960)
QWEN3_8B = ModelShape("Qwen3-8B", 8.2, 36, 4096, 8, 128, context=40_960)
QWEN3_14B = ModelShape("Qwen3-14B", 14.8, 40, 5120, 8, 128, context=40_960)
QWEN3_32B = ModelShape("Qwen3-32B", 32.8, 64, 5120, 8, 128, context=40_960)
QWEN25_1_5B = ModelShape("Qwen2.5-1.5B-Instruct", 1.54, 28, 1536, 2, 128)
QWEN25_7B = ModelShape("Qwen2.5-7B-Instruct", 7.6, 28, 3584, 4, 128, vocab=152_064)
QWEN25_7B_MATH_RL = ModelShape("Qwen2.5-7B-RL", 7.6, 28, 3584, 4, 128, vocab=152_064)
QWEN3_8B_RL = ModelShape("Qwen3-8B-RL", 8.2, 36, 4096, 8, 128, context=40_960)
QWEN3_14B_RL = ModelShape("Qwen3-14B-RL", 14.8, 40, 5120, 8, 128, context=40_960)
QWEN3_32B_RL = ModelShape("Qwen3-32B-RL", 32.8, 64, 5120, 8, 128, context=40_960)
TINY = ModelShape("addition", 0.0005, 3, 96, 4, 24, 50, context=64)

SCALES: dict[str, Scale] = {
    "tiny": Scale("tiny", TINY, TINY, 1, 1, 1, 1, 2, 2, gpu=False),
    "1.5B": Scale("1.5B", QWEN25_1_5B, QWEN25_7B_MATH_RL, 2, 1, 1, 1, 4, 1),
    "4B": Scale("4B", QWEN3_4B, QWEN3_8B_RL, 2, 1, 1, 1, 4, 1),
    "7B": Scale("7B", QWEN25_7B, QWEN25_7B_MATH_RL, 2, 1, 1, 1, 4, 1),
    "8B": Scale("8B", QWEN3_8B, QWEN3_8B_RL, 2, 1, 1, 1, 4, 1),
    "14B": Scale("14B", QWEN3_14B, QWEN3_14B_RL, 2, 2, 1, 2, 8, 2, 2),
    "32B": Scale("32B", QWEN3_32B, QWEN3_32B_RL, 2, 4, 1, 4, 16, 1, 4),
}


def model_paths(scale: str, student: Path | None, teacher: Path | None) -> tuple[Path, Path]:
    """Configured model folders, or the scale's defaults where the config leaves them unset."""
    entry = SCALES[scale]
    return student or entry.model_path("student"), teacher or entry.model_path("teacher")


# ----------------------------------------------------------------------------- GPUs and clusters
@dataclass(frozen=True)
class GpuType:
    peak_flops: float
    """Dense bf16 peak FLOP/s."""
    mem_gb: float
    """Memory of the common variant (a cluster spec names its own)."""
    hbm_bytes_per_s: float
    """Memory bandwidth: what bounds decoding."""


GPU_TYPES: dict[str, GpuType] = {
    "H100": GpuType(989e12, 80, 3.35e12),
    "H800": GpuType(989e12, 80, 3.35e12),
    "H200": GpuType(989e12, 141, 4.8e12),
    "H20": GpuType(148e12, 96, 4.0e12),
    "A100": GpuType(312e12, 80, 2.0e12),
    "A800": GpuType(312e12, 80, 2.0e12),
    "L40S": GpuType(362e12, 48, 0.864e12),
}


@dataclass(frozen=True)
class ClusterSpec:
    """GPUs per node and their type: a spec string, a YAML file, or the live Ray cluster's nodes."""

    nodes: int
    gpus_per_node: int
    gpu: str
    gpu_mem_gb: float
    node_gpus: tuple[int, ...] = ()
    """GPUs of each node when they differ (a live cluster); empty: `gpus_per_node` on every node."""

    @property
    def per_node(self) -> list[int]:
        return list(self.node_gpus) if self.node_gpus else [self.gpus_per_node] * self.nodes

    @property
    def gpus(self) -> int:
        return sum(self.per_node)

    @property
    def gpu_type(self) -> GpuType | None:
        return GPU_TYPES.get(self.gpu)

    def __str__(self) -> str:
        if self.node_gpus:
            return f"live Ray cluster: {len(self.node_gpus)} node(s) with {'+'.join(map(str, self.node_gpus))} GPUs ({self.gpu})"
        return f"{self.nodes}x{self.gpus_per_node}x{self.gpu}-{self.gpu_mem_gb:g}GB"


def parse_cluster(spec: str) -> ClusterSpec:
    """`4x8xH100-80GB` -> 4 nodes of 8 H100 80 GB; or a YAML file with the four fields.
    Raises ValueError on a malformed spec or a GPU type without known peak FLOP/s."""
    m = re.fullmatch(r"(\d+)x(\d+)x([A-Za-z0-9]+)-(\d+(?:\.\d+)?)GB", spec.strip())
    if m:
        cluster = ClusterSpec(int(m[1]), int(m[2]), m[3], float(m[4]))
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"cluster spec '{spec}': expected NODESxGPUSxTYPE-MEMGB (e.g. 4x8xH100-80GB) or a YAML file")
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
        try:
            cluster = ClusterSpec(int(data["nodes"]), int(data["gpus_per_node"]), str(data["gpu"]), float(data["gpu_mem_gb"]))
        except KeyError as err:
            raise ValueError(f"{path}: missing key {err.args[0]} (need nodes, gpus_per_node, gpu, gpu_mem_gb)") from None
    if cluster.gpu not in GPU_TYPES:
        raise ValueError(f"unknown GPU type '{cluster.gpu}' (known: {', '.join(GPU_TYPES)}); its peak FLOP/s and "
                         "memory bandwidth are needed for the cost model")
    if cluster.nodes < 1 or cluster.gpus_per_node < 1 or cluster.gpu_mem_gb <= 0:
        raise ValueError(f"cluster spec '{spec}': nodes, GPUs per node and memory must be positive")
    return cluster


# ----------------------------------------------------------------------------- memory
GPU_RESERVE_GB = 1.5
"""Per GPU, outside what the formulas count: the CUDA context (~0.5 GB) and NCCL's buffers and streams."""
FRAGMENTATION = 0.05
"""Share of a GPU the caching allocator loses to fragmentation at the peak."""


def usable_gb(gpu_mem_gb: float) -> float:
    """What a process may plan to use of a GPU: its memory less fragmentation and the CUDA/NCCL reserve."""
    return gpu_mem_gb * (1 - FRAGMENTATION) - GPU_RESERVE_GB


LOGIT_CHUNK = 2048
"""Tokens per logits chunk on the learner (the chunked log-prob / loss computation)."""
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
DS_REDUCE_BUCKET = 5e8
"""DeepSpeed's `reduce_bucket_size` (elements; its default, which the learner's ds_config keeps)."""
DS_SUB_GROUP = 1e9
"""DeepSpeed's ZeRO-3 `sub_group_size` (elements, default): the optimizer steps one sub-group at a time."""
DS_MAX_LIVE = 1e9
"""DeepSpeed's `stage3_max_live_parameters` (elements, default): gathered parameters kept for reuse."""


def intermediate_size(shape: ModelShape) -> float:
    """MLP width I estimated from the parameter count: Psi = 2 V h + L (2 h^2 + 2 h kv d + 3 h I)
    (SwiGLU, untied embeddings, q/o projections h x h; a tied model's I comes out ~20% low), unless
    the shape names it."""
    if shape.intermediate is not None:
        return shape.intermediate
    per_layer = (shape.params_b * 1e9 - 2 * shape.vocab * shape.hidden) / shape.layers
    attn = 2 * shape.hidden ** 2 + 2 * shape.hidden * shape.kv_heads * shape.head_dim
    return max(per_layer - attn, 0.0) / (3 * shape.hidden)


def layer_act_bytes(shape: ModelShape, dtype: str = "bf16", intermediate: float | None = None) -> float:
    """Bytes per token one decoder layer saves for backward: 8 h elements (two RMSNorms' input and
    output, q after RoPE, attention output and its reshaped copy) + 2 kv d (K, V) + 4 I (gate, up,
    SiLU(gate), their product); in bf16 the RMSNorms also keep their fp32 upcast input (+ 2 x 2 h bytes).
    Measured on the CPU Qwen2 (fp32, sdpa, no padding): 1.7% more. A padded batch repeats K and V to
    every head under sdpa: + 2 (h - kv d) elements."""
    w = DTYPE_BYTES[dtype]
    inter = intermediate_size(shape) if intermediate is None else intermediate
    return (8 * shape.hidden + 2 * shape.kv_heads * shape.head_dim + 4 * inter) * w + 2 * (4 - w) * shape.hidden


def learner_mem_phases(shape: ModelShape, ranks: int, tokens_per_gpu: int, anchor: bool = False, *,
                       dtype: str = "bf16", cuda: bool = True, checkpointing: bool = True,
                       logit_chunk: int = LOGIT_CHUNK, response_tokens: int | None = None,
                       intermediate: float | None = None) -> dict[str, dict[str, float]]:
    """Bytes per learner rank by phase and term (formulas in the module docstring): `states` live
    throughout; `backward` and `optimizer_step` come on top of them at different times; `load` and
    `partition` are the setup's peaks (the loaded model, then ZeRO-3's flat buffers)."""
    w, psi = DTYPE_BYTES[dtype], shape.params_b * 1e9
    part = psi / ranks
    sub = min(part, DS_SUB_GROUP)
    layer = layer_act_bytes(shape, dtype, intermediate) * tokens_per_gpu
    chunk = min(logit_chunk, response_tokens if response_tokens is not None else tokens_per_gpu)
    logits = chunk * shape.vocab * (12 + (4 - w))
    # ZeRO-3 keeps gathered parameters alive from forward to backward (up to stage3_max_live_parameters);
    # at one rank a gathered parameter is its partition, and only the largest module's full gradient remains
    gathered = w * (min(psi, DS_MAX_LIVE) if ranks > 1 else shape.vocab * shape.hidden)
    if checkpointing:  # the logits chunks run backward first, then each layer is recomputed in turn
        backward = {"checkpoints": shape.layers * tokens_per_gpu * shape.hidden * w, "gathered": gathered,
                    "layer_or_logits": max(layer, logits)}
    else:
        backward = {"activations": shape.layers * layer, "gathered": gathered, "logits": logits}
    return {
        "states": {"weights": w * part, "grads": 4 * part, "master": 4 * part, "adam": 8 * part,
                   "anchor": 4 * part if anchor else 0.0, "direction": w * part if anchor else 0.0,
                   "reduce_bucket": w * min(DS_REDUCE_BUCKET, psi)},
        "backward": backward,
        "optimizer_step": {"master_grad": 4 * sub,
                           "temporaries": max(w * sub if w < 4 else 0.0, 0.0 if cuda else 8 * sub)},
        "load": {"largest_module": w * shape.vocab * shape.hidden},
        "partition": {"weights": w * part, "grads": 4 * part, "master": 4 * part, "master_grad": 4 * sub},
    }


HOST_PROCESS_GB = {"learner": 3.0, "engine": 4.0}
"""Host memory of one process before any model: torch, CUDA, NCCL and DeepSpeed (learner) or vLLM (engine)."""


def learner_host_terms(shape: ModelShape, ranks: int, *, bucket_mb: float, dtype: str = "bf16",
                       rank0: bool = False) -> dict[str, float]:
    """Host bytes of one learner rank (formulas in the module docstring): the process, the rows of one
    tensor covering its partition while loading, and on rank 0 one weight bucket while publishing."""
    w = DTYPE_BYTES[dtype]
    terms = {"process": HOST_PROCESS_GB["learner"] * GB, "loading": w * shape.vocab * shape.hidden / ranks}
    if rank0:
        terms["bucket"] = bucket_mb * 2**20 + w * shape.vocab * shape.hidden
    return terms


def peak_bytes(phases: dict[str, dict[str, float]]) -> float:
    """max(load, partition, states + the larger of backward and optimizer_step)."""
    total = {k: sum(v.values()) for k, v in phases.items()}
    return max(total["load"], total["partition"], total["states"] + max(total["backward"], total["optimizer_step"]))


def learner_mem_gb(shape: ModelShape, ranks: int, tokens_per_gpu: int, anchor: bool = False, **kw) -> float:
    """Peak GB per learner rank; keywords as `learner_mem_phases` (default: the GPU path, bf16,
    fused Adam, gradient checkpointing)."""
    return peak_bytes(learner_mem_phases(shape, ranks, tokens_per_gpu, anchor, **kw)) / GB


def engine_mem_terms(shape: ModelShape, tp: int, seq_len: int, *, batch: int = 1, dtype: str = "bf16",
                     sampled: int = 0) -> dict[str, float]:
    """Bytes per engine GPU (vLLM: `batch` = 1, the minimum it must hold) or per HF rollout worker
    (`sampled` > 0: HF `generate` keeping every step's logits) by term."""
    w = DTYPE_BYTES[dtype]
    terms = {"weights": w * shape.params_b * 1e9 / tp,
             "kv": batch * seq_len * shape.kv_bytes_per_token() * w / 2 / tp}
    if sampled:
        terms["sampled_logits"] = batch * sampled * shape.vocab * 4
    return terms


def conversion_bytes(shape: ModelShape, dtype: str, checkpoint_dtype: str) -> float:
    """An HF model loaded in another dtype than its checkpoint's (fp32 on a CPU from a bf16 checkpoint)
    converts one tensor at a time: the load's peak is its weights + the largest tensor as read (the
    embedding, V h). 0 when the dtypes agree (the GPU path: bf16 from bf16)."""
    return 0.0 if dtype == checkpoint_dtype else DTYPE_BYTES[checkpoint_dtype] * shape.vocab * shape.hidden


def scorer_mem_terms(shape: ModelShape, *, tokens: int, chunk: int = LOGIT_CHUNK, dtype: str = "bf16",
                     shards: int = 1) -> dict[str, float]:
    """Bytes of an HF model scoring without grad (teacher, ExOPD's reference): its weights (split over
    `shards` GPUs), one micro-batch of `tokens` through the widest layer, and one logits chunk."""
    w = DTYPE_BYTES[dtype]
    return {"weights": w * shape.params_b * 1e9 / shards,
            "activations": tokens * (2 * shape.hidden + intermediate_size(shape)) * w,
            "logits": min(chunk, tokens) * shape.vocab * 12}


def engine_mem_gb(shape: ModelShape, tp: int, seq_len: int, **kw) -> float:
    return sum(engine_mem_terms(shape, tp, seq_len, **kw).values()) / GB


def evaluator_mem_terms(shape: ModelShape, *, bucket_mb: float, batch: int, seq_len: int,
                        dtype: str = "fp32", bucket_dtype: str = "fp32") -> dict[str, float]:
    """Bytes of an HF evaluator loading a candidate (formed on the learner) bucket by bucket and scoring
    it (GPU evaluators are vLLM engines: `engine_mem_terms`): its model, two buckets (the one being
    copied and the next being fetched; a bucket is at most `sync_bucket_mb` + its last tensor, in the
    learner's working dtype; the next is fetched after the last tensor of this one is copied), greedy
    decoding of D_v."""
    w, largest = DTYPE_BYTES[dtype], DTYPE_BYTES[bucket_dtype] * shape.vocab * shape.hidden
    bucket = bucket_mb * 2**20 + largest  # a bucket closes once it reaches bucket_mb
    return {"weights": w * shape.params_b * 1e9, "bucket": bucket,
            "kv": batch * seq_len * shape.kv_bytes_per_token() * w / 2, "logits": 2 * batch * shape.vocab * 4}


# ----------------------------------------------------------------------------- placement
def first_fit(bundle_gpus: list[int], free: list[int]) -> list[int] | None:
    """Node index of each bundle (first-fit decreasing; a bundle's GPUs stay on one node), or None.
    `free` is updated in place when everything fits."""
    trial = list(free)
    nodes = [0] * len(bundle_gpus)
    for i in sorted(range(len(bundle_gpus)), key=lambda i: -bundle_gpus[i]):
        node = next((n for n, f in enumerate(trial) if f >= bundle_gpus[i]), None)
        if node is None:
            return None
        trial[node] -= bundle_gpus[i]
        nodes[i] = node
    free[:] = trial
    return nodes


def concurrent_trials(bundle_gpus: list[int], cluster: ClusterSpec) -> int:
    """How many copies of one trial fit at once."""
    free, count = cluster.per_node, 0
    if not any(bundle_gpus):
        return 1
    while first_fit(bundle_gpus, free) is not None and count < 10_000:
        count += 1
    return count


# ----------------------------------------------------------------------------- model folders
def shape_of(folder: str | Path) -> ModelShape:
    """A local checkpoint's shape from its `config.json` (parameters counted from the architecture:
    embeddings, q/k/v/o with their biases, SwiGLU MLP, norms, an untied lm_head unless tied)."""
    import json

    hf = json.loads((Path(folder) / "config.json").read_text())
    h, layers, vocab = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]
    heads = hf["num_attention_heads"]
    kv, d = hf.get("num_key_value_heads", heads), hf.get("head_dim") or h // heads
    inter = hf.get("intermediate_size", 4 * h)
    attn = h * heads * d + 2 * h * kv * d + heads * d * h + heads * d + 2 * kv * d
    per_layer = attn + 3 * h * inter + 2 * h
    params = vocab * h * (1 if hf.get("tie_word_embeddings") else 2) + layers * per_layer + h
    return ModelShape(Path(folder).name, params / 1e9, layers, h, kv, d, vocab,
                      context=hf.get("max_position_embeddings") or 32_768, intermediate=inter)
