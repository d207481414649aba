"""Teacher scorers: log pi_t(y_t | x, y_<t) of every sampled response token, at temperature 1.0.

On a GPU the HF scorer runs on the actor's GPU in the checkpoint's dtype (bf16), micro-batched with
its logits in sequence chunks (`core.modeling.score_responses`); on the CPU in fp32. ExOPD's
reference policy pi_ref (the frozen initial student) is scored the same way beside the teacher, on
the same device (the plan counts its memory on the teacher's GPU)."""

from __future__ import annotations

from typing import Any

import torch

from actors.group import Placed
from actors.rollout import VllmRolloutWorker
from actors.weights import write_pid
from core.modeling import load_model, quiet_hf, score_responses


class TeacherScorer(Placed):
    """Plain Python; `ray.remote(TeacherScorer)` is applied in `actors/group.py`."""

    def __init__(self, cfg: dict[str, Any], index: int = 0) -> None:
        from actors import devices

        quiet_hf()
        torch.set_num_threads(1)
        self.cfg, self.index = cfg, index
        self.device = devices.device(0, f"teacher {index}")
        self.model = load_model(cfg["teacher_path"], devices.compute_dtype(self.device), self.device)
        self.task, self.tokenizer = None, None
        write_pid(cfg, "teacher", index)

    def generate(self, step: int, indices: list[int], handle: Any = None) -> dict[str, Any]:
        """Off-policy control: the teacher samples the responses (same format as a rollout worker)."""
        from actors.rollout import sample_batch
        from core.modeling import load_tokenizer
        from core.task import task_of

        if self.task is None:
            self.task, self.tokenizer = task_of(self.cfg), load_tokenizer(self.cfg["teacher_path"])
        return sample_batch(self.model, self.tokenizer, self.task, self.cfg, step, indices, self.index)

    @torch.no_grad()
    def score(self, batch: dict[str, Any], full: bool = False, topk: int | None = None,
              ref: bool = False) -> dict[str, torch.Tensor]:
        """{"logp": [B, R]} (masked); with `full` also the distribution "logp_full" [B, R, V]; with
        `topk` its top-k ("topk_ids", "topk_logp" [B, R, k]); with `ref` the reference policy's
        log-probs "ref_logp" [B, R] (ExOPD)."""
        if self.cfg.get("cross_tokenizer"):
            return self._score_cross(batch, full, topk, ref)
        out = score_responses(self.model, batch, topk=topk, full=full, **scoring_budget(self.cfg))
        if ref:
            out["ref_logp"] = reference_logp(self, batch)
        return out

    def _score_cross(self, batch: dict[str, Any], full: bool, topk: int | None, ref: bool) -> dict[str, torch.Tensor]:
        """The response text scored in the teacher's own tokens, aligned to the student's by bytes
        (`actors/cross_teacher.py`); the plan refuses the losses this cannot serve."""
        budget = scoring_budget(self.cfg)
        return cross_scores(self, lambda tb: score_responses(self.model, tb, **budget)["logp"], batch, full, topk, ref)


def cross_scores(actor: Any, score: Any, batch: dict[str, Any], full: bool, topk: int | None, ref: bool) -> dict[str, torch.Tensor]:
    """A teacher actor's cross-tokenizer scores (`actors/cross_teacher.py`) with its scoring pass `score`."""
    from actors.cross_teacher import score_cross

    if full or topk:
        raise ValueError("a different tokenizer from the student's: only the sampled-token loss runs (pg_reverse_kl)")
    if getattr(actor, "cross", None) is None:
        actor.cross = cross_context(actor.cfg)
    student_tok, teacher_tok, render, examples = actor.cross
    return score_cross(score, student_tok, teacher_tok, render, examples, batch,
                       ref_logp=reference_logp(actor, batch) if ref else None)


def cross_context(cfg: dict[str, Any]) -> tuple[Any, Any, Any, list]:
    """(student tokenizer, teacher tokenizer, prompt renderer in the teacher's template, training
    examples as the rollout indexes them) for cross-tokenizer scoring."""
    from core.config import JsonlTask
    from core.modeling import load_tokenizer
    from core.task import PromptRenderer, task_of

    task_cfg = cfg["task_cfg"]
    render = PromptRenderer(task_cfg, cfg["teacher_path"]) if isinstance(task_cfg, JsonlTask) else (lambda raw: raw)
    return load_tokenizer(cfg["student_path"]), load_tokenizer(cfg["teacher_path"]), render, task_of(cfg).train


def scoring_budget(cfg: dict[str, Any]) -> dict[str, int]:
    """Micro-batch tokens and logit-chunk positions of a no-grad scoring pass (the learner's budget)."""
    return {"max_tokens": cfg["learner"]["max_tokens_per_gpu"], "chunk_tokens": cfg["learner"]["logit_chunk_tokens"]}


def reference_logp(actor: Any, batch: dict[str, Any]) -> torch.Tensor:
    """log pi_ref(y_t) of the sampled tokens under the frozen initial student, [B, R] masked: an HF
    model loaded on first use on the actor's GPUs in the run's dtype (bf16; its layers split over a TP
    teacher's GPUs, beside the teacher engine: the plan counts it), scored micro-batched with chunked
    logits."""
    from actors import devices

    if getattr(actor, "reference", None) is None:
        who = f"{type(actor).__name__} reference"
        dev = devices.device(0, who)
        gpus = torch.cuda.device_count()
        for i in range(gpus):  # a TP teacher's GPUs: the reference's layers are split over all of them
            devices.check(i, who)
        actor.reference = load_model(actor.cfg["student_path"], devices.compute_dtype(dev),
                                     "balanced" if gpus > 1 else dev)
    return score_responses(actor.reference, batch, **scoring_budget(actor.cfg))["logp"]


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
        if self.cfg.get("cross_tokenizer"):
            return cross_scores(self, lambda tb: score_batch(self.llm, tb)["logp"], batch, full, topk, ref)
        out = score_batch(self.llm, batch, topk=topk)
        if ref:
            out["ref_logp"] = reference_logp(self, batch)
        return out
