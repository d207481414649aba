"""Scale registry: named model scales -> models and a GPU resource plan, checkable without GPUs.

`SCALES` is a plain dict. GPU scales follow the papers (Qwen3 / Qwen2.5 students; the teacher is
a larger or RL-tuned model of the same family); their checkpoints are local folders under
`$FORESIGHT_MODEL_ROOT` (default /models), never downloaded. The tiny scale is the embedded
CPU task.

Memory per GPU (GB = 1e9 bytes), Psi = parameters, N = ZeRO-3 ranks, TP = tensor parallel:
- learner, ZeRO-3 with bf16 weights/grads and fp32 Adam (ZeRO paper):  16 * Psi / N
  + activations with gradient checkpointing: L * T_gpu * h * 2 (one bf16 checkpoint per layer)
    + 34 * T_gpu * h (one layer recomputed, flash attention)
  + logits in chunks of 2048 tokens: 2048 * V * 4
- vLLM engine (rollout, teacher scoring, evaluator): 2 * Psi / TP weights + KV cache for at
  least one full sequence: S * 2 * L * kv_heads * head_dim * 2 / TP, within
  `gpu_memory_utilization` of the GPU.
T_gpu is the learner's max tokens per GPU per micro-batch (the papers: 22,000).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
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

    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16


@dataclass(frozen=True)
class Scale:
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


QWEN3_4B = ModelShape("Qwen3-4B", 4.0, 36, 2560, 8, 128)
QWEN3_8B = ModelShape("Qwen3-8B", 8.2, 36, 4096, 8, 128)
QWEN3_14B = ModelShape("Qwen3-14B", 14.8, 40, 5120, 8, 128)
QWEN3_32B = ModelShape("Qwen3-32B", 32.8, 64, 5120, 8, 128)
QWEN25_1_5B = ModelShape("Qwen2.5-1.5B-Instruct", 1.54, 28, 1536, 2, 128)
QWEN25_7B = ModelShape("Qwen2.5-7B-Instruct", 7.6, 28, 3584, 4, 128)
QWEN25_7B_MATH_RL = ModelShape("Qwen2.5-7B-RL", 7.6, 28, 3584, 4, 128)
QWEN3_8B_RL = ModelShape("Qwen3-8B-RL", 8.2, 36, 4096, 8, 128)
QWEN3_14B_RL = ModelShape("Qwen3-14B-RL", 14.8, 40, 5120, 8, 128)
QWEN3_32B_RL = ModelShape("Qwen3-32B-RL", 32.8, 64, 5120, 8, 128)
TINY = ModelShape("addition", 0.0005, 3, 96, 4, 24, 50)

SCALES: dict[str, Scale] = {
    "tiny": Scale("tiny", TINY, TINY, 1, 1, 1, 1, 2, 2, gpu=False),
    "1.5B": Scale("1.5B", QWEN25_1_5B, QWEN25_7B_MATH_RL, 2, 1, 1, 1, 4, 1),
    "4B": Scale("4B", QWEN3_4B, QWEN3_8B_RL, 2, 1, 1, 1, 4, 1),
    "7B": Scale("7B", QWEN25_7B, QWEN25_7B_MATH_RL, 2, 1, 1, 1, 4, 1),
    "8B": Scale("8B", QWEN3_8B, QWEN3_8B_RL, 2, 1, 1, 1, 4, 1),
    "14B": Scale("14B", QWEN3_14B, QWEN3_14B_RL, 2, 2, 1, 2, 8, 2, 2),
    "32B": Scale("32B", QWEN3_32B, QWEN3_32B_RL, 2, 4, 1, 4, 12, 1, 4),
}

def model_paths(scale: str, student: Path | None, teacher: Path | None) -> tuple[Path, Path]:
    """Configured model folders, or the scale's defaults where the config leaves them unset."""
    entry = SCALES[scale]
    return student or entry.model_path("student"), teacher or entry.model_path("teacher")


GPU_TYPES = {"H100": 989e12, "H800": 989e12, "H20": 148e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}
"""Dense bf16 peak FLOP/s per GPU, for the GPU-hour estimate."""


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int
    gpus_per_node: int
    gpu: str
    gpu_mem_gb: float

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def __str__(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node}x{self.gpu}-{self.gpu_mem_gb:g}GB"


def parse_cluster(spec: str) -> ClusterSpec:
    """`4x8xH100-80GB` -> 4 nodes of 8 H100 80 GB; or a YAML file with the four fields."""
    m = re.fullmatch(r"(\d+)x(\d+)x([A-Za-z0-9]+)-(\d+(?:\.\d+)?)GB", spec.strip())
    if m:
        return ClusterSpec(int(m[1]), int(m[2]), m[3], float(m[4]))
    path = Path(spec)
    if path.is_file():
        import yaml

        data = yaml.safe_load(path.read_text()) or {}
        try:
            return ClusterSpec(int(data["nodes"]), int(data["gpus_per_node"]), str(data["gpu"]), float(data["gpu_mem_gb"]))
        except KeyError as err:
            raise ValueError(f"{path}: missing key {err.args[0]} (need nodes, gpus_per_node, gpu, gpu_mem_gb)") from None
    raise ValueError(f"cluster spec '{spec}': expected NODESxGPUSxTYPE-MEMGB (e.g. 4x8xH100-80GB) or a YAML file")


@dataclass
class Bundle:
    """GPUs that must sit on one node (a tensor-parallel group, or one learner rank)."""

    role: str
    gpus: int
    mem_gb: float


@dataclass
class GpuPlan:
    scale: str
    bundles: list[Bundle] = field(default_factory=list)
    placement: list[list[str]] = field(default_factory=list)
    """Per node of one trial: the roles placed there."""
    errors: list[str] = field(default_factory=list)

    @property
    def gpus(self) -> int:
        return sum(b.gpus for b in self.bundles)


def learner_mem_gb(shape: ModelShape, ranks: int, tokens_per_gpu: int) -> float:
    states = 16 * shape.params_b * 1e9 / ranks
    acts = shape.layers * tokens_per_gpu * shape.hidden * 2 + 34 * tokens_per_gpu * shape.hidden
    logits = 2048 * shape.vocab * 4
    return (states + acts + logits) / GB


def engine_mem_gb(shape: ModelShape, tp: int, seq_len: int) -> float:
    return (2 * shape.params_b * 1e9 / tp + seq_len * shape.kv_bytes_per_token() / tp) / GB


def plan_gpus(scale: Scale, cluster: ClusterSpec, *, seq_len: int, tokens_per_gpu: int = 22_000,
              gpu_memory_utilization: float = 0.6, evaluators: int | None = None) -> GpuPlan:
    """Bundles for one trial, memory checks, and a first-fit-decreasing placement on the nodes."""
    plan = GpuPlan(scale.name)
    engine_cap = gpu_memory_utilization * cluster.gpu_mem_gb
    n_eval = scale.evaluators if evaluators is None else evaluators
    groups = [("rollout", scale.rollout_engines, scale.rollout_tp, engine_mem_gb(scale.student, scale.rollout_tp, seq_len), engine_cap),
              ("teacher", scale.teacher_replicas, scale.teacher_tp, engine_mem_gb(scale.teacher, scale.teacher_tp, seq_len), engine_cap),
              ("learner", scale.learner_ranks, 1, learner_mem_gb(scale.student, scale.learner_ranks, tokens_per_gpu), cluster.gpu_mem_gb),
              ("evaluator", n_eval, scale.evaluator_tp, engine_mem_gb(scale.student, scale.evaluator_tp, seq_len), engine_cap)]
    for role, count, tp, mem, cap in groups:
        if tp > cluster.gpus_per_node:
            plan.errors.append(f"{role}: tensor parallel {tp} > {cluster.gpus_per_node} GPUs per node")
        if mem > cap:
            plan.errors.append(f"{role}: needs {mem:.1f} GB per GPU, {cap:.1f} GB available "
                               f"({scale.student.name if role != 'teacher' else scale.teacher.name}, TP {tp})")
        plan.bundles += [Bundle(role, tp, mem) for _ in range(count)]
    free = [cluster.gpus_per_node] * cluster.nodes
    plan.placement = [[] for _ in range(cluster.nodes)]
    for b in sorted(plan.bundles, key=lambda b: -b.gpus):
        node = next((i for i, f in enumerate(free) if f >= b.gpus), None)
        if node is None:
            what = "an evaluator pool with no spare GPUs" if b.role == "evaluator" else f"the {b.role} group"
            plan.errors.append(f"{what}: the trial needs {plan.gpus} GPUs, the cluster has {cluster.gpus} "
                               f"({cluster})")
            break
        free[node] -= b.gpus
        plan.placement[node].append(f"{b.role}x{b.gpus}")
    return plan


def gpu_hours(scale: Scale, cluster: ClusterSpec, plan: GpuPlan, *, steps: int, prompts: int,
              samples: int, prompt_len: int, response_len: int, fill: float = 0.5) -> float:
    """Rough estimate: FLOPs / (GPUs x peak x MFU), MFU 0.35 for training/scoring, 0.05 for decoding.

    Tokens per step T = prompts * samples * (prompt_len + fill * response_len). FLOPs per step:
    decoding 2 Psi_s T, teacher scoring 2 Psi_t T, learner 8 Psi_s T (forward + backward +
    recompute with gradient checkpointing).
    """
    peak = GPU_TYPES.get(cluster.gpu, 300e12)
    tokens = prompts * samples * (prompt_len + fill * response_len)
    ps, pt = scale.student.params_b * 1e9, scale.teacher.params_b * 1e9
    seconds = steps * (2 * ps * tokens / (0.05 * peak) + (2 * pt + 8 * ps) * tokens / (0.35 * peak)) / plan.gpus
    return seconds * plan.gpus / 3600


def concurrent_trials(plan: GpuPlan, cluster: ClusterSpec) -> int:
    """How many copies of this trial fit at once (first-fit-decreasing, bundles stay on one node)."""
    free = [cluster.gpus_per_node] * cluster.nodes
    count = 0
    while True:
        trial = list(free)
        for b in sorted(plan.bundles, key=lambda b: -b.gpus):
            node = next((i for i, f in enumerate(trial) if f >= b.gpus), None)
            if node is None:
                return count
            trial[node] -= b.gpus
        free, count = trial, count + 1
        if count > 10_000:
            return count

