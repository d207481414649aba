"""Teacher scorers: log pi_t(y_t | x, y_<t) of every sampled response token, at temperature 1.0."""

from __future__ import annotations

from typing import Any

import torch

from actors.group import Placed
from actors.rollout import VllmRolloutWorker
from actors.weights import write_pid
from orchestrator.modeling import gather_logp, load_model, quiet_hf, response_logits


class TeacherScorer(Placed):
    """Plain Python; `ray.remote(TeacherScorer)` is applied in `actors/group.py`."""

    def __init__(self, cfg: dict[str, Any], index: int = 0) -> None:
        quiet_hf()
        torch.set_num_threads(1)
        self.cfg, self.index = cfg, index
        self.model = load_model(cfg["teacher_path"])
        self.task, self.tokenizer = None, None
        write_pid(cfg, "teacher", index)

    def generate(self, step: int, indices: list[int], handle: Any = None) -> dict[str, Any]:
        """Off-policy control: the teacher samples the responses (same format as a rollout worker)."""
        from actors.rollout import sample_batch
        from orchestrator.modeling import load_tokenizer
        from orchestrator.task import task_of

        if self.task is None:
            self.task, self.tokenizer = task_of(self.cfg), load_tokenizer(self.cfg["teacher_path"])
        return sample_batch(self.model, self.tokenizer, self.task, self.cfg, step, indices, self.index)

    @torch.no_grad()
    def score(self, batch: dict[str, Any], full: bool = False, topk: int | None = None,
              ref: bool = False) -> dict[str, torch.Tensor]:
        """{"logp": [B, R]} (masked); with `full` also the distribution "logp_full" [B, R, V]; with
        `topk` its top-k ("topk_ids", "topk_logp" [B, R, k]); with `ref` the reference policy's
        log-probs "ref_logp" [B, R] (ExOPD)."""
        logits = response_logits(self.model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"])
        logp_BRV = torch.log_softmax(logits, dim=-1)
        out = {"logp": gather_logp(logp_BRV, batch["response"]) * batch["response_mask"]}
        if full:
            out["logp_full"] = logp_BRV
        if topk:
            out["topk_logp"], out["topk_ids"] = logp_BRV.topk(min(topk, logp_BRV.shape[-1]), dim=-1)
        if ref:
            out["ref_logp"] = reference_logp(self, batch)
        return out


def reference_logp(actor: Any, batch: dict[str, Any]) -> torch.Tensor:
    """log pi_ref(y_t) of the sampled tokens under the frozen initial student (an HF model loaded on
    first use, on the actor's device), [B, R] masked."""
    if getattr(actor, "reference", None) is None:
        actor.reference = load_model(actor.cfg["student_path"]).to("cuda" if torch.cuda.is_available() else "cpu")
    device = next(actor.reference.parameters()).device
    with torch.no_grad():
        logits = response_logits(actor.reference, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                 batch["prompt_len"])
        logp = gather_logp(torch.log_softmax(logits, -1), batch["response"].to(device)).cpu()
    return logp * batch["response_mask"]


class VllmTeacherScorer(VllmRolloutWorker):
    """Backend `vllm`: teacher log-probs through vLLM prompt log-probs (`max_tokens=1`, temperature
    1.0), its top-k per position for the full-vocabulary losses (`loss.teacher_topk`), and teacher
    sampling for off-policy runs."""

    model_key, role = "teacher_path", "teacher"

    def sync(self, handle: Any) -> bool:
        """The teacher is frozen: student weight handles are ignored."""
        return False

    def score(self, batch: dict[str, Any], full: bool = False, topk: int | None = None,
              ref: bool = False) -> dict[str, torch.Tensor]:
        from actors.vllm_engine import score_batch

        if full:
            raise ValueError("teacher.backend=vllm cannot return the full distribution: set loss.teacher_topk")
        out = score_batch(self.llm, batch, topk=topk)
        if ref:
            out["ref_logp"] = reference_logp(self, batch)
        return out
