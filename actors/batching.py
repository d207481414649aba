"""The learner's view of a step's batch: only its own rows, fetched from the rollout and teacher
parts they overlap, split into token-budget micro-batches."""

from __future__ import annotations

from typing import Any

from core.losses import TokenBatch, grpo_advantages
from core.modeling import concat_batches, slice_batch


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
    batch.update({k: scores[k] for k in CROSS_STATS if k in scores})  # per-row, for the learner's statistics
    return batch, token_batch(batch, scores)


CROSS_STATS = ("chunks", "split")
"""Per-row statistics of a cross-tokenizer teacher (`actors/cross_teacher.py`): chunks, rows not round-tripped."""


def token_batch(batch: dict[str, Any], scores: dict[str, Any]) -> TokenBatch:
    """Per-token loss inputs from a rollout batch and the teacher's scores of it."""
    return TokenBatch(
        tokens_BR=batch["response"], mask_BR=batch["response_mask"], teacher_logp_BR=scores["logp"],
        rollout_logp_BR=batch["logp"], teacher_logp_BRV=scores.get("logp_full"),
        teacher_topk_ids_BRK=scores.get("topk_ids"), teacher_topk_logp_BRK=scores.get("topk_logp"),
        ref_logp_BR=scores.get("ref_logp"), rlvr_adv_BR=batch.get("rlvr_adv"),
    )


def row_lengths(batch: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(real prompt tokens, real response tokens) of every row of a rollout batch."""
    P = batch["prompt_len"]
    return batch["attention_mask"][:, :P].sum(1).tolist(), batch["response_mask"].sum(1).long().tolist()


def micro_batches(prompts: list[int], responses: list[int], max_tokens: int) -> list[list[int]]:
    """Rows packed into micro-batches of at most `max_tokens` tokens, a micro-batch costing its rows x
    its own width (longest prompt + longest response in it: the learner trims each micro-batch to
    that, as verl's remove-padding and OpenRLHF's packing avoid computing on padding). Rows are taken
    longest first and a micro-batch grows while it fits (at least one row each), so rows of similar
    length share one. Returns the row indices of each micro-batch, in batch order within it (a batch
    that fits one micro-batch is computed exactly as laid out)."""
    order = sorted(range(len(prompts)), key=lambda i: (-(prompts[i] + responses[i]), i))
    out: list[list[int]] = []
    current: list[int] = []
    width_p = width_r = 0
    for i in order:
        wp, wr = max(width_p, prompts[i]), max(width_r, max(responses[i], 1))
        if current and (len(current) + 1) * (wp + wr) > max_tokens:
            out.append(current)
            current, wp, wr = [], prompts[i], max(responses[i], 1)
        current.append(i)
        width_p, width_r = wp, wr
    return [sorted(mb) for mb in out + ([current] if current else [])]  # batch order within a micro-batch


def trimmed(batch: dict[str, Any], x: TokenBatch, rows: list[int]) -> tuple[dict[str, Any], TokenBatch]:
    """Rows `rows` of a rank's batch cut to their own width: the left-padding columns no row of them
    uses and the response columns past their longest response are dropped. Returns the
    micro-batch (input_ids, attention_mask, prompt_len) and its per-token loss inputs."""
    import torch

    idx = torch.tensor(rows, dtype=torch.long, device=batch["input_ids"].device)
    P = batch["prompt_len"]
    att = batch["attention_mask"].index_select(0, idx)
    p0 = int(P - att[:, :P].sum(1).max())
    r1 = max(1, int(batch["response_mask"].index_select(0, idx).sum(1).max()))
    ids = batch["input_ids"].index_select(0, idx)[:, p0 : P + r1]
    return ({"input_ids": ids, "attention_mask": att[:, p0 : P + r1], "prompt_len": P - p0},
            x.map(lambda t: t.index_select(0, idx)[:, :r1]))
