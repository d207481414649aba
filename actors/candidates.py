"""Scoring EffOPD candidates W_t + c (W_t - anchor) on D_v: a mixin for every actor that holds the
student (evaluators, and rollout workers when the pool is borrowed).

Each candidate is formed on the learner ranks, where the fp32 masters and the anchor live
(partition-local, `Learner.publish_weights("candidate", c)`), and reaches its evaluator once, in
the working dtype, as weight buckets streamed into the held model: what is scored here is bit for
bit what every rank and engine holds if the learner jumps to that candidate, in fp32 and bf16 alike.

V is greedy accuracy on D_v (`method.score: accuracy`, the default), the accuracy of one answer per
item sampled at T = 1.0 (`sampled`, as the authors' code scores candidates; item i is sampled with
seed `val_seed * 10007 + i` on vLLM, one seeded batch on HF, the same for every candidate and after a
resume), or with `teacher_kl` (HF actors) minus the mean reverse KL to the teacher on the candidate's
own samples of D_v (one sampling seed for all).
"""

from __future__ import annotations

from typing import Any

import torch

from actors.weights import WeightsHandle, stream
from core.modeling import generate, greedy_accuracy, load_model, score_responses


def val_seed(cfg: dict[str, Any]) -> int:
    """The sampling seed of D_v scoring (`sampled`, `teacher_kl`): fixed per run."""
    return cfg["seed"] + 12345


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
        if self.cfg.get("val_score") == "sampled":
            texts = self.complete([e.prompt for e in self.val], 1.0, val_seed(self.cfg))
            return sum(self.task.rewards(texts, [e.answer for e in self.val])) / max(len(self.val), 1)
        return greedy_accuracy(self.model, self.tokenizer, self.val, self.task.rewards, self.cfg["rollout"]["max_new_tokens"])

    @torch.no_grad()
    def _teacher_kl(self) -> float:
        """-(1/N) sum_t (log pi_cand(y_t) - log pi_t(y_t)) on the candidate's samples of D_v (fixed seed)."""
        from actors.teacher import scoring_budget

        if getattr(self, "teacher", None) is None:  # beside the student, on its device and in its dtype
            self.teacher = load_model(self.cfg["teacher_path"], self.model.dtype, self.device)
        out = generate(self.model, self.tokenizer, [e.prompt for e in self.val], self.cfg["rollout"]["max_new_tokens"],
                       greedy=False, seed=val_seed(self.cfg))
        q = score_responses(self.teacher, out, **scoring_budget(self.cfg))["logp"]
        m = out["response_mask"]
        return -float(((out["logp"] - q) * m).sum() / m.sum())


class VllmScoresCandidates(ScoresCandidates):
    """vLLM actors: greedy (or sampled) accuracy on D_v through the engine."""

    def validation_score(self) -> float:
        total, n = self._val_rewards(range(len(self.val)))
        return total / max(n, 1)

    def score_received(self, meta: list, indices: list[int]) -> tuple[float, int]:
        """GPU (NCCL): receive one candidate from learner rank 0 (runs alongside `Learner.nccl_send` on
        this engine's group), then (sum of rewards, count) over this engine's share of D_v,
        `indices` (the trainer splits D_v across the pool: every engine holds the same candidate)."""
        self.nccl_receive(meta, -1)  # holds a candidate now: the next sync reloads whatever it is given
        return self._val_rewards(indices)

    def _val_rewards(self, indices) -> tuple[float, int]:
        """(sum of rewards, count) over D_v[indices]: greedy, or one T = 1 sample per item seeded by
        the item's index in D_v (so any split of D_v over engines samples the same answers)."""
        from actors.vllm_engine import sample, to_batch

        indices = [i for i in indices if i < len(self.val)]
        examples = [self.val[i] for i in indices]
        if not examples:
            return 0.0, 0
        if self.cfg.get("val_score") != "sampled":
            return self.rewards(self.greedy([e.prompt for e in examples]), examples), len(examples)
        ids = self._encode([e.prompt for e in examples])
        tokens, _ = sample(self.llm, ids, max_new_tokens=self.cfg["rollout"]["max_new_tokens"],
                           eos_id=self.tokenizer.eos_token_id, temperature=1.0,
                           seeds=[val_seed(self.cfg) * 10_007 + i for i in indices])
        out = to_batch(ids, tokens, None, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        return self.rewards(out, examples), len(examples)
