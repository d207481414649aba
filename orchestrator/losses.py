"""OPD losses on the student's own samples (registry keyed by `loss.type`).

Notation per response token t of a sampled sequence y ~ pi_s(.|x):
    s_t = log pi_s(y_t | x, y_<t)   (learner, with grad)
    q_t = log pi_t(y_t | x, y_<t)   (teacher)
    r_t = log pi_rollout(y_t | ...) (the rollout engine's sampling log-prob)

- `pg_reverse_kl` (default; the papers'): advantage A_t = lam * (q_t - s_t), detached, zero
  discount (the negative sampled-token reverse KL), and
        loss = -(1/N) sum_t w_t * A_t * s_t
  whose gradient is the policy gradient of -KL(pi_s || pi_t) on the sampled tokens.
- `full_reverse_kl`: loss = (1/N) sum_t w_t * sum_v p_s(v) (log p_s(v) - log p_t(v)).
- `forward_kl`:      loss = (1/N) sum_t w_t * sum_v p_t(v) (log p_t(v) - log p_s(v)).

- `sft`:             loss = -(1/N) sum_t w_t * s_t  (cross-entropy on the sampled tokens).

Training controls (geometry paper): with `rlvr_adv_BR` the policy-gradient advantage becomes
alpha * A_OPD + (1 - alpha) * A_RLVR (GRPO group advantage of the verifiable reward, see
`grpo_advantages`); token sparsification keeps a share rho of the tokens (`sparsify`) and
rescales the kept terms by N / N_kept.

w_t = min(exp(s_t - r_t), threshold), detached: the token-level rollout importance correction
for a rollout engine whose log-probs differ from the learner's (1 when disabled). N is the
number of response tokens in the *global* batch, so data-parallel gradient averaging over
`world_size` ranks gives the exact global token mean: each rank returns sum * world_size / N.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from orchestrator.modeling import gather_logp


@dataclass
class LossInputs:
    logits_BRV: torch.Tensor
    """Student logits predicting each response token (with grad)."""
    tokens_BR: torch.Tensor
    mask_BR: torch.Tensor
    teacher_logp_BR: torch.Tensor
    """Teacher log-prob of each sampled token."""
    rollout_logp_BR: torch.Tensor
    teacher_logp_BRV: torch.Tensor | None = None
    """Teacher log-probs over the vocabulary (full-distribution losses only)."""
    adv_scale: float = 1.0
    """lam: 1 for OPD, > 1 for ExOPD reward extrapolation."""
    rlvr_adv_BR: torch.Tensor | None = None
    """GRPO advantage of each token's sequence (mixing control)."""
    rlvr_mix: float = 1.0
    """alpha: weight of the OPD advantage."""
    keep_BR: torch.Tensor | None = None
    """Token-sparsification mask, already rescaled (N / N_kept on kept tokens, 0 elsewhere)."""
    importance_correction: bool = True
    importance_threshold: float = 5.0
    norm: float = 1.0
    """Global response-token count N divided by world size."""


def importance_weights(s_BR: torch.Tensor, r_BR: torch.Tensor, threshold: float, enabled: bool) -> torch.Tensor:
    if not enabled:
        return torch.ones_like(s_BR)
    return torch.exp(s_BR.detach() - r_BR).clamp(max=threshold)


def _pg_reverse_kl(x: LossInputs, logp_BRV: torch.Tensor, s_BR: torch.Tensor, w_BR: torch.Tensor) -> torch.Tensor:
    adv_BR = x.adv_scale * (x.teacher_logp_BR - s_BR.detach())
    if x.rlvr_adv_BR is not None:
        adv_BR = x.rlvr_mix * adv_BR + (1.0 - x.rlvr_mix) * x.rlvr_adv_BR
    return -(w_BR * adv_BR * s_BR)


def _sft(x: LossInputs, logp_BRV: torch.Tensor, s_BR: torch.Tensor, w_BR: torch.Tensor) -> torch.Tensor:
    return -(w_BR * s_BR)


def _full_reverse_kl(x: LossInputs, logp_BRV: torch.Tensor, s_BR: torch.Tensor, w_BR: torch.Tensor) -> torch.Tensor:
    kl_BR = (logp_BRV.exp() * (logp_BRV - x.teacher_logp_BRV)).sum(-1)
    return w_BR * kl_BR


def _forward_kl(x: LossInputs, logp_BRV: torch.Tensor, s_BR: torch.Tensor, w_BR: torch.Tensor) -> torch.Tensor:
    t_BRV = x.teacher_logp_BRV
    kl_BR = (t_BRV.exp() * (t_BRV - logp_BRV)).sum(-1)
    return w_BR * kl_BR


LOSSES: dict[str, Callable] = {
    "pg_reverse_kl": _pg_reverse_kl,
    "full_reverse_kl": _full_reverse_kl,
    "forward_kl": _forward_kl,
    "sft": _sft,
}
NEEDS_TEACHER_DISTRIBUTION = {"full_reverse_kl", "forward_kl"}


def opd_loss(kind: str, x: LossInputs) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-rank loss (sum over tokens / norm) and token-sum statistics for logging."""
    logp_BRV = torch.log_softmax(x.logits_BRV.float(), dim=-1)
    s_BR = gather_logp(logp_BRV, x.tokens_BR)
    w_BR = importance_weights(s_BR, x.rollout_logp_BR, x.importance_threshold, x.importance_correction)
    terms_BR = LOSSES[kind](x, logp_BRV, s_BR, w_BR) * x.mask_BR
    if x.keep_BR is not None:
        terms_BR = terms_BR * x.keep_BR
    loss = terms_BR.sum() / x.norm
    with torch.no_grad():
        m = x.mask_BR
        ratio = torch.exp(s_BR - x.rollout_logp_BR)
        stats = {
            "tokens": m.sum().item(),
            "loss_sum": terms_BR.sum().item(),
            "reverse_kl_sum": ((s_BR - x.teacher_logp_BR) * m).sum().item(),
            "is_ratio_sum": (ratio * m).sum().item(),
            "is_clipped_sum": ((ratio > x.importance_threshold).float() * m).sum().item(),
            "logp_diff_sum": ((s_BR - x.rollout_logp_BR).abs() * m).sum().item(),
        }
    return loss, stats


def grpo_advantages(rewards_B: torch.Tensor, group: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_group) / (std_group + eps) for consecutive groups of `group` samples per prompt."""
    r = rewards_B.float().view(-1, group)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True, unbiased=False) + eps)
    return adv.view(-1)


def sparsify(mask_BR: torch.Tensor, score_BR: torch.Tensor, rho: float, mode: str, seed: int) -> torch.Tensor:
    """Keep ceil(rho * N) of the N response tokens (largest `score`, or random), scaled by N / kept."""
    flat_mask = mask_BR.flatten() > 0
    n = int(flat_mask.sum())
    kept = max(1, math.ceil(rho * n))
    if mode == "random":
        gen = torch.Generator().manual_seed(seed)
        score = torch.rand(flat_mask.shape, generator=gen)
    else:
        score = score_BR.flatten().float().clone()
    score[~flat_mask] = -math.inf
    keep = torch.zeros_like(flat_mask, dtype=torch.float32)
    keep[torch.topk(score, kept).indices] = n / kept
    return keep.view_as(mask_BR)
