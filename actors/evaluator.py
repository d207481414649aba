"""Evaluator pool: scores EffOPD candidates W_t + c (W_t - anchor) on D_v, in parallel.

W_t and the anchor reach every evaluator once per search through the object store; each
evaluator builds its own candidates locally with the same `extrapolate` expression the learner
uses, so a candidate it scores is bit-identical to the weights the learner would jump to.
"""

from __future__ import annotations

from typing import Any

import torch

from actors.weights import WeightsHandle, fetch_state_dict
from orchestrator.extrapolation import extrapolate
from orchestrator.modeling import (gather_logp, generate, greedy_accuracy, load_model, load_tokenizer, quiet_hf,
                                   response_logits)
from orchestrator.task import build_task


class CandidateEvaluator:
    """Plain Python; `ray.remote(CandidateEvaluator)` is applied in `actors/group.py`."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        quiet_hf()
        torch.set_num_threads(1)
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg["student_path"])
        self.model = load_model(cfg["student_path"])
        task = build_task(cfg["task_cfg"])
        self.reward = task.reward
        self.val = task.validation_set(cfg["val_size"], cfg["seed"])
        self.teacher = load_model(cfg["teacher_path"]) if cfg.get("val_score") == "teacher_kl" else None
        self._cache: tuple[int, int, dict, dict] | None = None

    def _weights(self, current: WeightsHandle, anchor: WeightsHandle) -> tuple[dict, dict]:
        if self._cache is None or self._cache[:2] != (current.version, anchor.version):
            self._cache = (current.version, anchor.version, fetch_state_dict(current), fetch_state_dict(anchor))
        return self._cache[2], self._cache[3]

    def score(self, current: WeightsHandle, anchor: WeightsHandle, coefs: list[float]) -> list[float]:
        """V(W_t + c (W_t - anchor)) for each c: greedy accuracy on D_v, or -reverse KL to the teacher."""
        w, a = self._weights(current, anchor)
        scores = []
        for c in coefs:
            self.model.load_state_dict({k: extrapolate(w[k], a[k], c) for k in w}, strict=False)
            scores.append(self._teacher_kl() if self.teacher is not None else
                          greedy_accuracy(self.model, self.tokenizer, self.val, self.reward,
                                          self.cfg["rollout"]["max_new_tokens"]))
        return scores

    @torch.no_grad()
    def _teacher_kl(self) -> float:
        """-(1/N) sum_t (log pi_cand(y_t) - log pi_t(y_t)) on the candidate's samples of D_v (fixed seed)."""
        out = generate(self.model, self.tokenizer, [e.prompt for e in self.val], self.cfg["rollout"]["max_new_tokens"],
                       greedy=False, seed=self.cfg["seed"] + 12345)
        logits = response_logits(self.teacher, out["input_ids"], out["attention_mask"], out["prompt_len"])
        q = gather_logp(torch.log_softmax(logits, -1), out["response"])
        m = out["response_mask"]
        return -float(((out["logp"] - q) * m).sum() / m.sum())
