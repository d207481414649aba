"""Scoring EffOPD candidates W_t + c (W_t - anchor) on D_v: a mixin for every actor that holds the
student (evaluators, and rollout workers when the pool is borrowed).

Each candidate is formed on the learner ranks, where the fp32 masters and the anchor live
(partition-local, `Learner.publish_weights("candidate", c)`), and reaches its evaluator once, in
the working dtype, as weight buckets streamed into the held model: what is scored here is bit for
bit what every rank and engine holds if the learner jumps to that candidate, in fp32 and bf16 alike.

V is greedy accuracy on D_v (the paper), or with `method.score: teacher_kl` (HF actors) minus the
mean reverse KL to the teacher on the candidate's own samples of D_v (one sampling seed for all).
"""

from __future__ import annotations

from typing import Any

import torch

from actors.weights import WeightsHandle, stream
from core.modeling import generate, greedy_accuracy, load_model, score_responses


class ScoresCandidates:
    """Needs `load_stream(named)`, `validation_score()`, `self.cfg`, `self.task` from the actor."""

    cfg: dict[str, Any]
    version: int

    @property
    def val(self) -> list:
        """D_v: `val_size` training examples drawn once with the run's seed."""
        if getattr(self, "_val", None) is None:
            self._val = self.task.validation_set(self.cfg["val_size"], self.cfg["seed"])
        return self._val

    def score(self, candidates: list[WeightsHandle]) -> list[float]:
        """V of each candidate's weights, in order (one load and one validation pass each)."""
        scores = []
        for handle in candidates:
            self.load_stream(stream(handle))
            self.version = -1  # holds a candidate now: the next sync reloads whatever it is given
            scores.append(self.validation_score())
        return scores


class HfScoresCandidates(ScoresCandidates):
    """HF actors (`self.model`, `self.tokenizer`): greedy accuracy, or -reverse KL to the teacher."""

    def validation_score(self) -> float:
        if self.cfg.get("val_score") == "teacher_kl":
            return self._teacher_kl()
        return greedy_accuracy(self.model, self.tokenizer, self.val, self.task.rewards, self.cfg["rollout"]["max_new_tokens"])

    @torch.no_grad()
    def _teacher_kl(self) -> float:
        """-(1/N) sum_t (log pi_cand(y_t) - log pi_t(y_t)) on the candidate's samples of D_v (fixed seed)."""
        from actors.teacher import scoring_budget

        if getattr(self, "teacher", None) is None:  # beside the student, on its device and in its dtype
            self.teacher = load_model(self.cfg["teacher_path"], self.model.dtype, self.device)
        out = generate(self.model, self.tokenizer, [e.prompt for e in self.val], self.cfg["rollout"]["max_new_tokens"],
                       greedy=False, seed=self.cfg["seed"] + 12345)
        q = score_responses(self.teacher, out, **scoring_budget(self.cfg))["logp"]
        m = out["response_mask"]
        return -float(((out["logp"] - q) * m).sum() / m.sum())


class VllmScoresCandidates(ScoresCandidates):
    """vLLM actors: greedy accuracy on D_v through the engine."""

    def validation_score(self) -> float:
        total, n = self._greedy_rewards(range(len(self.val)))
        return total / max(n, 1)

    def score_received(self, meta: list, indices: list[int]) -> tuple[float, int]:
        """GPU (NCCL): receive one candidate from learner rank 0 (runs alongside `Learner.nccl_send` on
        this engine's group), then (sum of greedy rewards, count) over this engine's share of D_v,
        `indices` (the trainer splits D_v across the pool: every engine holds the same candidate)."""
        self.nccl_receive(meta, -1)  # holds a candidate now: the next sync reloads whatever it is given
        return self._greedy_rewards(indices)

    def _greedy_rewards(self, indices) -> tuple[float, int]:
        examples = [self.val[i] for i in indices if i < len(self.val)]
        if not examples:
            return 0.0, 0
        return self.rewards(self.greedy([e.prompt for e in examples]), examples), len(examples)
