"""The learner's view of a step's batch: only its own rows, fetched from the rollout and teacher
parts they overlap, split into token-budget micro-batches."""

from __future__ import annotations

from typing import Any

from orchestrator.losses import TokenBatch, grpo_advantages
from orchestrator.modeling import concat_batches, slice_batch


def fetch_rows(parts: list, lo: int, hi: int, samples_per_prompt: int,
               loss_cfg: dict[str, Any]) -> tuple[dict[str, Any], TokenBatch]:
    """Rows lo:hi of the global batch: the rollout layout (ids, masks, prompt width, rewards) and the
    per-token loss inputs. `parts` are (rollout ref, teacher ref, rows) in batch order; only parts
    that overlap lo:hi are fetched. GRPO group advantages are computed per rollout part before
    slicing (a part holds whole groups: every sample of a prompt comes from the same worker)."""
    import ray

    rollout, teacher, start = [], [], 0
    for r_ref, t_ref, n in parts:
        a, b = max(lo, start), min(hi, start + int(n))
        if a < b:
            r, t = ray.get([r_ref, t_ref])
            if loss_cfg["rlvr_mix"] < 1.0:
                adv = grpo_advantages(r["rewards"], samples_per_prompt)
                r = {**r, "rlvr_adv": adv[:, None] * r["response_mask"]}
            rollout.append(slice_batch(r, a - start, b - start))
            teacher.append(slice_batch(t, a - start, b - start))
        start += int(n)
    batch, scores = concat_batches(rollout), concat_batches(teacher)
    return batch, token_batch(batch, scores)


def token_batch(batch: dict[str, Any], scores: dict[str, Any]) -> TokenBatch:
    """Per-token loss inputs from a rollout batch and the teacher's scores of it."""
    return TokenBatch(
        tokens_BR=batch["response"], mask_BR=batch["response_mask"], teacher_logp_BR=scores["logp"],
        rollout_logp_BR=batch["logp"], teacher_logp_BRV=scores.get("logp_full"),
        teacher_topk_ids_BRK=scores.get("topk_ids"), teacher_topk_logp_BRK=scores.get("topk_logp"),
        ref_logp_BR=scores.get("ref_logp"), rlvr_adv_BR=batch.get("rlvr_adv"),
    )


def micro_batches(rows: int, width: int, max_tokens: int) -> list[tuple[int, int]]:
    """Contiguous row ranges of at most `max_tokens` padded tokens (at least one row each)."""
    per = max(1, max_tokens // max(width, 1))
    return [(a, min(a + per, rows)) for a in range(0, rows, per)]
