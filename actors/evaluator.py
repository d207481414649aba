"""Evaluator pool: scores EffOPD candidates W_t + c (W_t - anchor) on D_v, in parallel
(`method.evaluators: dedicated`; with `borrowed` the rollout workers do it, `actors/candidates.py`).

Backends: `CandidateEvaluator` (an HF model) and `VllmCandidateEvaluator` (a vLLM engine, the GPU
scales' default). An evaluator is a student-holding worker of its own role: it never samples
training batches.
"""

from __future__ import annotations

from actors.rollout import RolloutWorker, VllmRolloutWorker


class CandidateEvaluator(RolloutWorker):
    """HF backend. Plain Python; `ray.remote(CandidateEvaluator)` is applied in `actors/group.py`."""

    role = "evaluator"


class VllmCandidateEvaluator(VllmRolloutWorker):
    """vLLM backend. GPU (NCCL weight sync): candidates arrive by broadcast from learner rank 0 on the
    `evaluator` group (`score_received`). Object store (CPU, simulated GPU): each candidate is streamed
    into the engine (in-process weight loader; a local safetensors file for TP > 1)."""

    role = "evaluator"
