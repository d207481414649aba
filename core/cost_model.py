"""The planner's cost model: seconds and busy device-seconds per OPD step, by role, for any layout.

Every role's time is a fixed latency (per decode iteration, per scoring call, per learner step, per
weight sync, per driver step) plus work over a throughput constant. The constants (`Throughput`) are
per device type; a measured run replaces them (`core/calibration.py`, `foresight plan --calibrate`).

Per engine of TP devices, with b = ceil(sequences / engines) sequences, R = the response cap, fill
= mean response length / R, g = b fill R generated tokens, P the prompt, W = w Psi the weights,
kv = KV bytes per token, BW the device's memory bandwidth, F its peak FLOP/s:

- decoding, vLLM (continuous batching: finished sequences leave, waiting ones join, so the total
  tokens set the work, not the longest sequence): c = min(b, 256 (vLLM's `max_num_seqs`), the KV
  cache's tokens / (P + fill R)) sequences at once, I = max(R, g / c) iterations,
      t = I latency_decode + max((I W + g ctx kv) / (TP decode_bw BW), 2 Psi g / (TP prefill_mfu F))
  with ctx = P + (2/3) fill R the mean context a generated token reads (lengths uniform in [0, 2 fill R]).
- decoding, HF `generate` (a static batch runs to its longest sequence, finished rows still computed):
  I = R, t = R latency_decode + max(R (W + b (P + R/2) kv) / (decode_bw BW), 2 Psi b R / (prefill_mfu F)).
- teacher scoring (prefill, compute-bound): per replica, calls x latency_forward +
  2 Psi_t tokens / (replicas TP prefill_mfu F); one call per rollout shard it scores.
- learner (ZeRO-3): latency_learner + k Psi tokens padding / (ranks train_mfu F), k = 8 with gradient
  checkpointing (forward, backward, recompute), 6 without.
- weight sync: latency_sync + w Psi / sync_bytes_per_s.

The step (`StepCost.step_seconds`): the strict loop runs rollout -> teacher -> learner -> sync in
turn. Pipelined (`pipeline.max_staleness` s >= 1) on the steps no barrier (evaluation, checkpoint,
search) drains: s = 1 overlaps the producer half (rollout then teacher: the batch of step t+1 can
only be sampled once W_t exists, so its rollout and scoring run in turn) with the learner:
max(rollout + teacher, learner + sync); s >= 2 also overlaps the teacher scoring batch t+1 with the
rollout of batch t+2: max(rollout, teacher, learner + sync). Rollout and teacher engines that share
their GPUs (colocated) take turns on them: their sum is one stage. Evaluation, search and the
driver's per-step latency come on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

MAX_NUM_SEQS = 256
"""vLLM's default `max_num_seqs`: sequences an engine decodes at once."""


@dataclass(frozen=True)
class Device:
    """What bounds each phase on one device: dense peak FLOP/s (bf16 on GPUs, fp32 on a CPU thread),
    memory bandwidth, memory."""

    peak_flops: float
    hbm_bytes_per_s: float
    mem_gb: float = 0.0


CPU_THREAD = Device(96e9, 10e9)
"""One CPU thread (AVX2 FMA: 2 x 8 fp32 lanes x 2 flops x ~3 GHz; ~10 GB/s of memory bandwidth): the
device of a CPU plan, every actor one thread (`OMP_NUM_THREADS=1`)."""


@dataclass(frozen=True)
class Throughput:
    """The cost model's constants for one device type (module docstring: where each enters)."""

    decode_bw: float = 0.7
    """Share of memory bandwidth decoding reaches."""
    prefill_mfu: float = 0.40
    """Share of peak FLOP/s scoring (prefill) reaches."""
    train_mfu: float = 0.35
    """Share of peak FLOP/s training reaches."""
    sync_bytes_per_s: float = 25e9
    """Weight-sync bandwidth (NCCL broadcast cross-node; the object store on CPU)."""
    latency_decode: float = 0.0
    """Seconds per decode iteration besides its bytes (scheduling, sampling, kernel launches)."""
    latency_forward: float = 0.0
    """Seconds per scoring call besides its FLOPs."""
    latency_learner: float = 0.0
    """Seconds per learner step besides its FLOPs (ZeRO-3 bookkeeping, optimizer, metrics)."""
    latency_sync: float = 0.0
    """Seconds per weight sync besides its bytes."""
    latency_step: float = 0.0
    """The driver's seconds per step outside every role (dispatch, metrics, logging)."""
    source: str = "defaults"
    """Where the figures come from: `defaults (<device>)`, or `measured: <run>`."""

    FITTED = ("decode_bw", "prefill_mfu", "train_mfu", "sync_bytes_per_s", "latency_step")


_GPU_MEASURED = Throughput(train_mfu=0.55, latency_learner=1.0, latency_step=0.5)
"""H100/H200 class: `benchmarks/results/gpu_check.json` (H200, one ZeRO-3 rank, 26,271 tokens per
step in 2 micro-batches) measured 1.20 s at 0.5B and 1.61 s at 1.5B; step = latency + 8 Psi
tokens / (mfu F) through both gives mfu 0.55 and a 1.0 s latency per step (its 20% at 1.5B is
that latency over a small step). Decoding and prefill keep the usual shares (0.7 of bandwidth,
0.4 of peak) until a run calibrates them."""

DEFAULTS: dict[str, Throughput] = {
    **{gpu: replace(_GPU_MEASURED, source=f"defaults ({gpu}; learner from gpu_check.json on H200)")
       for gpu in ("H100", "H800", "H200", "H20")},
    **{gpu: Throughput(source=f"defaults ({gpu})") for gpu in ("A100", "A800", "L40S")},
    "cpu": Throughput(sync_bytes_per_s=2e9, latency_decode=0.003, latency_forward=0.005, latency_learner=0.04,
                      latency_sync=0.02, latency_step=0.02, source="defaults (cpu)"),
}
"""Per device type. CPU latencies are a one-thread actor's fixed costs (Python, HF `generate`'s
per-iteration work, DeepSpeed's step on gloo), measured once on a 2-core machine across batch sizes
(rollout 16-256 prompts of the math twin); the throughput shares are placeholders a run calibrates."""


def defaults(device: str) -> Throughput:
    return DEFAULTS.get(device, Throughput(source=f"defaults ({device})"))


@dataclass(frozen=True)
class Workload:
    """What one phase processes."""

    sequences: int
    prompt_len: int
    response_len: int
    fill: float = 0.5
    """Mean response length as a share of the cap (finished sequences stop early)."""

    @property
    def generated(self) -> float:
        return self.sequences * self.fill * self.response_len

    @property
    def tokens(self) -> float:
        return self.sequences * (self.prompt_len + self.fill * self.response_len)


@dataclass(frozen=True)
class Model:
    """What the cost model needs of a model: parameters, bytes of a weight, KV bytes per token."""

    params: float
    weight_bytes: int
    kv_bytes_per_token: float


def decode_seconds(model: Model, device: Device, thr: Throughput, engines: int, tp: int, work: Workload,
                   backend: Literal["vllm", "hf"] = "vllm", kv_tokens: float = math.inf) -> float:
    """Seconds the busiest of `engines` engines decodes its share of `work` (module docstring)."""
    if engines < 1 or work.sequences < 1:
        return 0.0
    b = math.ceil(work.sequences / engines)
    R, P = work.response_len, work.prompt_len
    weights = model.params * model.weight_bytes
    if backend == "vllm":
        g = b * work.fill * R
        c = max(1.0, min(b, MAX_NUM_SEQS, kv_tokens / max(P + work.fill * R, 1)))
        iters = max(R, g / c)
        ctx = P + 2 / 3 * work.fill * R
        memory = iters * weights + g * ctx * model.kv_bytes_per_token
        flops = 2 * model.params * g
    else:
        iters = R
        memory = R * (weights + b * (P + R / 2) * model.kv_bytes_per_token)
        flops = 2 * model.params * b * R
    return iters * thr.latency_decode + max(memory / (tp * thr.decode_bw * device.hbm_bytes_per_s),
                                            flops / (tp * thr.prefill_mfu * device.peak_flops))


def prefill_seconds(model: Model, device: Device, thr: Throughput, replicas: int, tp: int, tokens: float,
                    calls: int = 1) -> float:
    """A teacher replica scoring its share of `tokens` in `calls` calls."""
    return calls * thr.latency_forward + 2 * model.params * tokens / (replicas * tp * thr.prefill_mfu * device.peak_flops)


def learner_seconds(model: Model, device: Device, thr: Throughput, ranks: int, tokens: float, padding: float = 1.0,
                    checkpointing: bool = True) -> float:
    """One ZeRO-3 step over `tokens` (computed tokens = tokens x padding) on `ranks` ranks."""
    k = 8 if checkpointing else 6
    return thr.latency_learner + k * model.params * tokens * padding / (ranks * thr.train_mfu * device.peak_flops)


def sync_seconds(model: Model, thr: Throughput) -> float:
    return thr.latency_sync + model.params * model.weight_bytes / thr.sync_bytes_per_s


def learner_padding(work: Workload, ranks: int, max_tokens: int) -> float:
    """Tokens the learner computes per real token. Each rank packs its rows into micro-batches by length
    and trims each to its own width (`actors/batching.py`): with response lengths spread over [0, R]
    and n micro-batches per rank, a micro-batch spans ~R / n of that range, so a row carries ~R / (2n)
    padding: 1 + R / (2 n (prompt + fill R)). (Untrimmed, every row would cost prompt + R.)"""
    real = work.prompt_len + work.fill * work.response_len
    rows = max(1, math.ceil(work.sequences / max(ranks, 1)))
    n = max(1, math.ceil(rows * real / max(max_tokens, 1)))
    return 1.0 + work.response_len / (2 * n * real) if n < rows else (work.prompt_len + work.response_len) / real


LOOP = ("rollout", "teacher", "learner", "sync")


@dataclass
class StepCost:
    """Seconds per OPD step by phase, the devices each role holds, and the FLOPs behind them.

    `seconds`: rollout, teacher, learner, sync (the loop), and amortized per step eval, eval_sets,
    search, driver. `gpus`: devices per role (rollout, teacher, learner, evaluator); `colocated`:
    rollout and teacher engines share their devices."""

    seconds: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0
    padding: float = 1.0
    """Learner tokens computed per real token (`learner_padding`), already in `seconds["learner"]`."""
    overlap: float = 0.0
    """Share of steps whose producer half runs while the learner trains the step before (pipelined:
    every step no barrier drains; 0: the strict loop)."""
    staleness: int = 0
    gpus: dict[str, int] = field(default_factory=dict)
    colocated: bool = False
    search_on_rollout: bool = True
    """EffOPD candidates scored by the rollout engines (borrowed), else by dedicated evaluators."""

    def stage(self) -> tuple[float, float]:
        """(producer, consumer) of an overlapped step (module docstring)."""
        s = self.seconds
        rollout, teacher, consume = s.get("rollout", 0.0), s.get("teacher", 0.0), s.get("learner", 0.0) + s.get("sync", 0.0)
        produce = rollout + teacher if self.staleness <= 1 or self.colocated else max(rollout, teacher)
        return produce, consume

    @property
    def step_seconds(self) -> float:
        """Strict: the sum of the phases. Pipelined: max(producer, consumer) on the overlapped share of
        steps, their sum on the rest; plus eval, search and the driver's latency."""
        s = self.seconds
        produce, consume = self.stage()
        serial = s.get("rollout", 0.0) + s.get("teacher", 0.0) + consume
        core = self.overlap * max(produce, consume) + (1 - self.overlap) * serial
        return core + sum(v for k, v in s.items() if k not in LOOP)

    def busy(self) -> dict[str, float]:
        """Busy device-seconds per step by role: each role's devices x the seconds they work."""
        s, g = self.seconds, self.gpus
        evals = s.get("eval", 0.0) + s.get("eval_sets", 0.0)
        search = s.get("search", 0.0)
        out = {"rollout": g.get("rollout", 0) * (s.get("rollout", 0.0) + evals + (search if self.search_on_rollout else 0.0)),
               "teacher": g.get("teacher", 0) * s.get("teacher", 0.0),
               "learner": g.get("learner", 0) * (s.get("learner", 0.0) + s.get("sync", 0.0))}
        if g.get("evaluator"):
            out["evaluator"] = g["evaluator"] * search
        return out

    @property
    def reserved_devices(self) -> int:
        """Devices the trial holds (colocated teacher replicas sit on the rollout engines' devices)."""
        return sum(n for r, n in self.gpus.items() if not (self.colocated and r == "teacher"))

    @property
    def busy_share(self) -> float:
        """Busy device-seconds / reserved device-seconds per step."""
        reserved = self.reserved_devices * self.step_seconds
        return sum(self.busy().values()) / reserved if reserved else 0.0
