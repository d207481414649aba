"""OPD losses on the student's own samples (registry keyed by `loss.type`), computed per token so
the learner can evaluate them in sequence chunks (`actors/learner.py`).

Notation per response token t of a sampled sequence y ~ pi_s(.|x):
    s_t = log pi_s(y_t | x, y_<t)    (learner, with grad)
    q_t = log pi_t(y_t | x, y_<t)    (teacher)
    r_t = log pi_rollout(y_t | ...)  (the rollout engine's sampling log-prob)
    f_t = log pi_ref(y_t | x, y_<t)  (the frozen initial student, ExOPD only)

- `pg_reverse_kl` (default; the papers'): advantage A_t (detached, zero discount) and
        loss = -(1/N) sum_t w_t * A_t * s_t
  with A_t = q_t - s_t (OPD: the negative sampled-token reverse KL), or for ExOPD (G-OPD reward
  extrapolation, arXiv 2602.12125) A_t = lam (q_t - f_t) - (s_t - f_t); lam = 1 is OPD exactly.
- `full_reverse_kl`: loss = (1/N) sum_t sum_v p_s(v) (log p_s(v) - log p_t(v)).
- `forward_kl`:      loss = (1/N) sum_t sum_v p_t(v) (log p_t(v) - log p_s(v)).
- `sft`:             loss = -(1/N) sum_t w_t * s_t  (cross-entropy on the sampled tokens).

Full-vocabulary terms with the teacher's top-k only (152k vocabularies; verl, TRL and OpenRLHF do
the same), plus the sampled token (SPEC: "top-k plus the sampled token"): with K_t the teacher's
top-k ids at t, and the sampled y_t added when it is not among them (its teacher log-prob q_t comes
from the sampled-token score, which every teacher returns), P = p_s(K_t), Q = p_t(K_t),
    reverse: sum_{v in K_t} p_s(v) (log p_s(v) - log p_t(v)) + (1 - P) log((1 - P) / (1 - Q))
    forward: sum_{v in K_t} p_t(v) (log p_t(v) - log p_s(v)) + (1 - Q) log((1 - Q) / (1 - P))
i.e. the KL between the distributions coarsened to K_t plus one tail bucket: exact at k = V, and
a lower bound of the full KL that tightens as k grows (the log-sum inequality).

w_t = min(exp(s_t - r_t), threshold), detached: the token-level rollout importance correction for
the sampled-token losses (1 when disabled). The full-vocabulary terms sum over y_t analytically,
so the sampled token's ratio does not belong to them and they are not weighted (the prefix's
mismatch would need the product of earlier ratios; like verl and TRL, it is not corrected).

Training controls (geometry paper): with `rlvr_adv_BR` the policy-gradient advantage becomes
alpha * A_OPD + (1 - alpha) * A_RLVR (GRPO group advantage, see `grpo_advantages`); token
sparsification keeps a share rho of the tokens (`sparsify`) and rescales them by N / N_kept.
N is the number of response tokens in the *global* batch, so data-parallel averaging over W ranks
gives the exact global token mean: each rank's loss is its sum / (N / W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from core.modeling import gather_logp


@dataclass
class TokenBatch:
    """Per-token inputs of a batch, [B, R] unless noted (None: not used by this loss)."""

    tokens_BR: torch.Tensor
    mask_BR: torch.Tensor
    teacher_logp_BR: torch.Tensor
    rollout_logp_BR: torch.Tensor
    teacher_logp_BRV: torch.Tensor | None = None
    """The teacher's full log-distribution (small vocabularies)."""
    teacher_topk_ids_BRK: torch.Tensor | None = None
    """The teacher's top-k token ids (large vocabularies)..."""
    teacher_topk_logp_BRK: torch.Tensor | None = None
    """... and their log-probs."""
    ref_logp_BR: torch.Tensor | None = None
    """Reference-policy log-probs of the sampled tokens (ExOPD)."""
    rlvr_adv_BR: torch.Tensor | None = None
    """GRPO advantage of each token's sequence (mixing control)."""
    keep_BR: torch.Tensor | None = None
    """Token-sparsification weights (N / N_kept on kept tokens, 0 elsewhere)."""

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "TokenBatch":
        return replace(self, **{f.name: fn(v) for f in fields(self) if (v := getattr(self, f.name)) is not None})

    def positions(self, j0: int, j1: int) -> "TokenBatch":
        """Response positions j0:j1 (a sequence chunk)."""
        return self.map(lambda t: t[:, j0:j1])

    def rows(self, lo: int, hi: int) -> "TokenBatch":
        return self.map(lambda t: t[lo:hi])


@dataclass(frozen=True)
class LossSpec:
    kind: str = "pg_reverse_kl"
    lam: float = 1.0
    """ExOPD's lambda (1: OPD)."""
    rlvr_mix: float = 1.0
    """alpha: weight of the OPD advantage."""
    importance_correction: bool = True
    importance_threshold: float = 5.0


def importance_weights(s_BR: torch.Tensor, r_BR: torch.Tensor, threshold: float, enabled: bool) -> torch.Tensor:
    if not enabled:
        return torch.ones_like(s_BR)
    return torch.exp(s_BR.detach() - r_BR).clamp(max=threshold)


def advantage(spec: LossSpec, x: TokenBatch, s_BR: torch.Tensor) -> torch.Tensor:
    """A_t = q_t - s_t (OPD) or lam (q_t - f_t) - (s_t - f_t) (ExOPD), then RLVR mixing; detached."""
    s = s_BR.detach()
    if spec.lam == 1.0:
        adv_BR = x.teacher_logp_BR - s
    else:
        adv_BR = spec.lam * (x.teacher_logp_BR - x.ref_logp_BR) - (s - x.ref_logp_BR)
    if x.rlvr_adv_BR is not None:
        adv_BR = spec.rlvr_mix * adv_BR + (1.0 - spec.rlvr_mix) * x.rlvr_adv_BR
    return adv_BR


def _pg_reverse_kl(spec: LossSpec, x: TokenBatch, logp_BRV: torch.Tensor, s_BR: torch.Tensor) -> torch.Tensor:
    w_BR = importance_weights(s_BR, x.rollout_logp_BR, spec.importance_threshold, spec.importance_correction)
    return -(w_BR * advantage(spec, x, s_BR) * s_BR)


def _sft(spec: LossSpec, x: TokenBatch, logp_BRV: torch.Tensor, s_BR: torch.Tensor) -> torch.Tensor:
    w_BR = importance_weights(s_BR, x.rollout_logp_BR, spec.importance_threshold, spec.importance_correction)
    return -(w_BR * s_BR)


def _topk_kl(logp_BRV: torch.Tensor, ids_BRK: torch.Tensor, t_BRK: torch.Tensor, reverse: bool,
             y_BR: torch.Tensor, t_y_BR: torch.Tensor) -> torch.Tensor:
    """KL over the teacher's top-k ids, the sampled token y_t when it is not among them (teacher
    log-prob `t_y_BR`), and one tail bucket (see the module docstring). A teacher id past the
    student's vocabulary (a teacher with more embedding rows for the same tokenizer: Qwen2.5-7B's
    152,064 vs 1.5B's 151,936) is no bucket of its own: its teacher mass joins the tail."""
    V = logp_BRV.shape[-1]
    outside_BR = ~(ids_BRK == y_BR[..., None]).any(-1) & (y_BR < V)
    ids_BRK = torch.cat([ids_BRK, torch.where(outside_BR, y_BR, V)[..., None]], -1)  # V: no bucket
    t_BRK = torch.cat([t_BRK, t_y_BR[..., None]], -1)
    valid_BRK = ids_BRK < V
    s_BRK = logp_BRV.gather(-1, torch.where(valid_BRK, ids_BRK, 0))
    ps_BRK = torch.where(valid_BRK, s_BRK.exp(), 0.0)
    pt_BRK = torch.where(valid_BRK, t_BRK.exp(), 0.0)
    P = ps_BRK.sum(-1).clamp(max=1.0)
    Q = pt_BRK.sum(-1).clamp(max=1.0)
    tail_s, tail_t = (1.0 - P).clamp_min(1e-12), (1.0 - Q).clamp_min(1e-12)
    gap_BRK = torch.where(valid_BRK, s_BRK - t_BRK, 0.0)
    if reverse:
        head = (ps_BRK * gap_BRK).sum(-1)
        tail = (1.0 - P) * (tail_s.log() - tail_t.log())
    else:
        head = (pt_BRK * -gap_BRK).sum(-1)
        tail = (1.0 - Q) * (tail_t.log() - tail_s.log())
    return head + tail


def _full_reverse_kl(spec: LossSpec, x: TokenBatch, logp_BRV: torch.Tensor, s_BR: torch.Tensor) -> torch.Tensor:
    if x.teacher_topk_ids_BRK is not None:
        return _topk_kl(logp_BRV, x.teacher_topk_ids_BRK, x.teacher_topk_logp_BRK, True, x.tokens_BR, x.teacher_logp_BR)
    return (logp_BRV.exp() * (logp_BRV - x.teacher_logp_BRV)).sum(-1)


def _forward_kl(spec: LossSpec, x: TokenBatch, logp_BRV: torch.Tensor, s_BR: torch.Tensor) -> torch.Tensor:
    if x.teacher_topk_ids_BRK is not None:
        return _topk_kl(logp_BRV, x.teacher_topk_ids_BRK, x.teacher_topk_logp_BRK, False, x.tokens_BR, x.teacher_logp_BR)
    t_BRV = x.teacher_logp_BRV
    return (t_BRV.exp() * (t_BRV - logp_BRV)).sum(-1)


LOSSES: dict[str, Callable] = {
    "pg_reverse_kl": _pg_reverse_kl,
    "full_reverse_kl": _full_reverse_kl,
    "forward_kl": _forward_kl,
    "sft": _sft,
}
NEEDS_TEACHER_DISTRIBUTION = {"full_reverse_kl", "forward_kl"}
STAT_KEYS = ("tokens", "loss_sum", "reverse_kl_sum", "is_ratio_sum", "is_clipped_sum", "logp_diff_sum")


def token_terms(spec: LossSpec, logits_BRV: torch.Tensor, x: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over tokens of the loss terms, with grad; [len(STAT_KEYS)] token sums of statistics, detached)."""
    logp_BRV = torch.log_softmax(logits_BRV.float(), dim=-1)
    s_BR = gather_logp(logp_BRV, x.tokens_BR)
    terms_BR = LOSSES[spec.kind](spec, x, logp_BRV, s_BR) * x.mask_BR
    if x.keep_BR is not None:
        terms_BR = terms_BR * x.keep_BR
    total = terms_BR.sum()
    with torch.no_grad():
        m = x.mask_BR
        ratio = torch.exp(s_BR - x.rollout_logp_BR)
        stats = torch.stack([m.sum(), total, ((s_BR - x.teacher_logp_BR) * m).sum(), (ratio * m).sum(),
                             ((ratio > spec.importance_threshold).float() * m).sum(),
                             ((s_BR - x.rollout_logp_BR).abs() * m).sum()])
    return total, stats


def opd_loss(spec: LossSpec, logits_BRV: torch.Tensor, x: TokenBatch, norm: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """One-shot loss (sum of terms / norm) and token-sum statistics: the reference the learner's
    chunked, micro-batched computation must equal."""
    total, stats = token_terms(spec, logits_BRV, x)
    return total / norm, dict(zip(STAT_KEYS, stats.tolist()))


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
