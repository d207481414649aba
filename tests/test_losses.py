"""OPD losses and advantages against a hand-computed example."""

from __future__ import annotations

import math

import torch

from core.losses import LossSpec, TokenBatch
from core.losses import opd_loss as _opd_loss

LOGITS = [[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]


class Example:
    """One sequence, two response tokens, vocabulary of 3; `norm` is N (the global token count)."""

    def __init__(self, norm: float = 2.0, **kw) -> None:
        self.logits_BRV = torch.tensor(LOGITS, requires_grad=True)
        teacher_full = torch.log_softmax(torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]]), -1)
        tokens = torch.tensor([[0, 1]])
        spec_keys = {"adv_scale": "lam", "importance_correction": "importance_correction",
                     "importance_threshold": "importance_threshold", "rlvr_mix": "rlvr_mix", "lam": "lam"}
        self.spec = LossSpec(**{spec_keys[k]: kw.pop(k) for k in list(kw) if k in spec_keys})
        base = dict(tokens_BR=tokens, mask_BR=torch.tensor([[1.0, 1.0]]),
                    teacher_logp_BR=teacher_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
                    rollout_logp_BR=torch.log_softmax(self.logits_BRV.detach(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
                    teacher_logp_BRV=teacher_full)
        base.update(kw)
        self.x, self.norm = TokenBatch(**base), norm

    def __getattr__(self, name):
        return getattr(self.x, name)


def example(**kw) -> Example:
    return Example(**kw)


def opd_loss(kind: str, ex: Example):
    from dataclasses import replace

    return _opd_loss(replace(ex.spec, kind=kind), ex.logits_BRV, ex.x, ex.norm)


def lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


def test_pg_reverse_kl_matches_hand_computation():
    x = example()
    loss, stats = opd_loss("pg_reverse_kl", x)
    s = [2.0 - lse([2, 0, 0]), 1.0 - lse([0, 1, 0])]          # log pi_s of the sampled tokens
    q = [0.0 - lse([0, 2, 0]), 0.0 - lse([0, 0, 3])]          # log pi_t of the sampled tokens
    adv = [qi - si for qi, si in zip(q, s)]                   # A_t = q_t - s_t (negative reverse KL)
    expected = -(adv[0] * s[0] + adv[1] * s[1]) / 2
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(stats["reverse_kl_sum"] / stats["tokens"], -(adv[0] + adv[1]) / 2, rel_tol=1e-6)
    # gradient: -(1/N) sum_t A_t d s_t / d logits, with d s_t/d z = onehot(y_t) - softmax(z_t)
    loss.backward()
    z0 = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0)
    want0 = -(adv[0]) * (torch.tensor([1.0, 0, 0]) - z0) / 2
    assert torch.allclose(x.logits_BRV.grad[0, 0], want0, atol=1e-6)


def test_exopd_advantage_extrapolates_relative_to_the_reference():
    """A_t = lam (q_t - f_t) - (s_t - f_t) on a 2-token example, computed by hand."""
    s = [2.0 - lse([2, 0, 0]), 1.0 - lse([0, 1, 0])]
    q = [0.0 - lse([0, 2, 0]), 0.0 - lse([0, 0, 3])]
    f = [-0.5, -2.0]  # the reference policy's log-probs of the two sampled tokens
    lam = 1.25
    adv = [lam * (qi - fi) - (si - fi) for qi, si, fi in zip(q, s, f)]
    loss, _ = opd_loss("pg_reverse_kl", example(lam=lam, ref_logp_BR=torch.tensor([f])))
    assert math.isclose(loss.item(), -(adv[0] * s[0] + adv[1] * s[1]) / 2, rel_tol=1e-6)
    # lam = 1 is OPD exactly (bit for bit: the reference is not even read)
    opd, _ = opd_loss("pg_reverse_kl", example())
    one, _ = opd_loss("pg_reverse_kl", example(lam=1.0, ref_logp_BR=torch.tensor([f])))
    assert one.item() == opd.item()
    # a constant factor on the advantage is not ExOPD: with f = s the extrapolation term differs
    scaled = [lam * (qi - si) for qi, si in zip(q, s)]
    assert not math.isclose(-(scaled[0] * s[0] + scaled[1] * s[1]) / 2, loss.item(), rel_tol=1e-3)


def test_full_reverse_and_forward_kl():
    x = example()
    loss, _ = opd_loss("full_reverse_kl", x)
    ps = torch.softmax(x.logits_BRV.detach(), -1)
    lps, lpt = ps.log(), x.teacher_logp_BRV
    assert math.isclose(loss.item(), (ps * (lps - lpt)).sum().item() / 2, rel_tol=1e-6)
    loss_f, _ = opd_loss("forward_kl", example())
    assert math.isclose(loss_f.item(), (lpt.exp() * (lpt - lps)).sum().item() / 2, rel_tol=1e-6)


def test_full_vocabulary_terms_ignore_the_sampled_tokens_importance_ratio():
    """sum_v p_s(v) (...) already sums over y_t: a rollout/learner mismatch on y_t must not weight it."""
    for kind in ("full_reverse_kl", "forward_kl"):
        base, _ = opd_loss(kind, example())
        shifted = example()
        shifted.x.rollout_logp_BR = shifted.x.rollout_logp_BR - 1.0  # ratio e^1 on both tokens
        moved, _ = opd_loss(kind, shifted)
        assert moved.item() == base.item(), kind


def test_topk_teacher_kl_converges_to_the_exact_kl():
    """Top-k plus a tail bucket: a lower bound of the full KL that tightens with k, exact at k = V."""
    from core.losses import token_terms

    gen = torch.Generator().manual_seed(0)
    V = 40
    student = torch.randn(3, 5, V, generator=gen) * 2
    teacher = torch.log_softmax(torch.randn(3, 5, V, generator=gen) * 2, -1)
    tokens = torch.randint(0, V, (3, 5), generator=gen)
    mask = torch.ones(3, 5)
    for kind in ("full_reverse_kl", "forward_kl"):
        exact_x = TokenBatch(tokens, mask, teacher.gather(-1, tokens[..., None])[..., 0], torch.zeros(3, 5),
                             teacher_logp_BRV=teacher)
        exact = token_terms(LossSpec(kind), student, exact_x)[0].item()
        errors = []
        for k in (1, 5, 20, V):
            top, ids = teacher.topk(k, -1)
            x = TokenBatch(tokens, mask, exact_x.teacher_logp_BR, torch.zeros(3, 5), teacher_topk_ids_BRK=ids,
                           teacher_topk_logp_BRK=top)
            approx = token_terms(LossSpec(kind), student, x)[0].item()
            assert approx <= exact + 1e-4, (kind, k)
            errors.append(exact - approx)
        assert errors == sorted(errors, reverse=True) and errors[0] > 0.1 * exact, (kind, errors)
        assert abs(errors[-1]) < 1e-4 * max(1.0, exact), (kind, errors)


def test_importance_ratio_is_clipped():
    x = example()
    # rollout thought token 0 was far less likely than the learner does: ratio e^3 > 5 -> clipped
    x.x.rollout_logp_BR = x.x.rollout_logp_BR - torch.tensor([[3.0, 0.0]])
    loss, stats = opd_loss("pg_reverse_kl", x)
    assert stats["is_clipped_sum"] == 1.0
    off, _ = opd_loss("pg_reverse_kl", example(rollout_logp_BR=x.x.rollout_logp_BR, importance_correction=False))
    s0 = 2.0 - lse([2, 0, 0])
    q0 = 0.0 - lse([0, 2, 0])
    # only token 0's weight changes: 5.0 instead of 1.0
    assert math.isclose(loss.item() - off.item(), -(5.0 - 1.0) * (q0 - s0) * s0 / 2, rel_tol=1e-5)


def test_masked_tokens_do_not_count():
    x = example(mask_BR=torch.tensor([[1.0, 0.0]]), norm=1.0)
    loss, stats = opd_loss("pg_reverse_kl", x)
    s0, q0 = 2.0 - lse([2, 0, 0]), 0.0 - lse([0, 2, 0])
    assert stats["tokens"] == 1.0
    assert math.isclose(loss.item(), -(q0 - s0) * s0, rel_tol=1e-6)


def test_grpo_group_advantages():
    from core.losses import grpo_advantages

    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), group=3)
    # group 1: mean 1/3, std sqrt(2)/3 ; group 2: mean 2/3
    s = math.sqrt(2) / 3
    want = [(1 - 1 / 3) / s, -1 / 3 / s, -1 / 3 / s, -2 / 3 / s, 1 / 3 / s, 1 / 3 / s]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-5)
    assert torch.allclose(grpo_advantages(torch.ones(4), 2), torch.zeros(4))


def test_rlvr_mixing_interpolates_advantages():
    x = example()
    rl = torch.tensor([[0.7, 0.7]])
    pure_opd, _ = opd_loss("pg_reverse_kl", example(rlvr_adv_BR=rl, rlvr_mix=1.0))
    base, _ = opd_loss("pg_reverse_kl", x)
    assert math.isclose(pure_opd.item(), base.item(), rel_tol=1e-7)
    grpo, _ = opd_loss("pg_reverse_kl", example(rlvr_adv_BR=rl, rlvr_mix=0.0))
    s = [2.0 - lse([2, 0, 0]), 1.0 - lse([0, 1, 0])]
    assert math.isclose(grpo.item(), -(0.7 * s[0] + 0.7 * s[1]) / 2, rel_tol=1e-6)
    half, _ = opd_loss("pg_reverse_kl", example(rlvr_adv_BR=rl, rlvr_mix=0.5))
    assert math.isclose(half.item(), 0.5 * base.item() + 0.5 * grpo.item(), rel_tol=1e-6)


def test_token_sparsification_keeps_top_kl_and_rescales():
    from core.losses import sparsify

    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    score = torch.tensor([[0.1, 3.0, 0.2, 2.0, 9.0]])  # the masked token must never be picked
    keep = sparsify(mask, score, 0.5, "top_kl", seed=0)
    assert keep.tolist() == [[0.0, 2.0, 0.0, 2.0, 0.0]]  # 2 of 4 kept, each weighted 4/2
    rand = sparsify(mask, score, 0.25, "random", seed=1)
    assert float((rand > 0).sum()) == 1.0 and float(rand.sum()) == 4.0 and rand[0, 4] == 0
    assert torch.equal(rand, sparsify(mask, score, 0.25, "random", seed=1))


def test_sft_loss_is_cross_entropy_on_samples():
    loss, _ = opd_loss("sft", example(importance_correction=False))
    s = [2.0 - lse([2, 0, 0]), 1.0 - lse([0, 1, 0])]
    assert math.isclose(loss.item(), -(s[0] + s[1]) / 2, rel_tol=1e-6)


def test_topk_ids_past_the_student_vocabulary_join_the_tail():
    """A teacher with more embedding rows (same tokenizer) may rank an id the student has no logit for:
    it is folded into the tail bucket, by hand: student V = 3, teacher top-2 = {id 1, id 4 (past V)}."""
    from core.losses import token_terms

    s = torch.log_softmax(torch.tensor([[[1.0, 2.0, 0.5]]]), -1)
    t_ids = torch.tensor([[[1, 4]]])
    t_top = torch.log(torch.tensor([[[0.6, 0.1]]]))
    x = TokenBatch(torch.tensor([[1]]), torch.ones(1, 1), t_top[..., 0], torch.zeros(1, 1), teacher_topk_ids_BRK=t_ids,
                   teacher_topk_logp_BRK=t_top)
    p1 = s[0, 0, 1].exp().item()
    head, tail_s, tail_t = p1 * (math.log(p1) - math.log(0.6)), 1 - p1, 1 - 0.6  # id 4's 0.1 is in the tail
    want = head + tail_s * (math.log(tail_s) - math.log(tail_t))
    got = token_terms(LossSpec("full_reverse_kl"), s, x)[0].item()
    assert math.isfinite(got) and math.isclose(got, want, rel_tol=1e-4), (got, want)


def test_topk_losses_give_the_sampled_token_its_own_bucket():
    """SPEC: top-k plus the sampled token. By hand: V = 4, teacher top-2 = {0, 1}, the sampled y = 3 is
    outside, so the buckets are {0}, {1}, {3} (teacher log-prob from the sampled-token score) and the
    tail {2}; when y is inside the top-k nothing is added."""
    from core.losses import token_terms

    ps = [0.1, 0.2, 0.3, 0.4]
    pt = [0.5, 0.3, 0.15, 0.05]
    s = torch.log(torch.tensor([[ps]]))
    t_ids, t_top = torch.tensor([[[0, 1]]]), torch.log(torch.tensor([[[pt[0], pt[1]]]]))

    def loss(kind: str, y: int) -> float:
        x = TokenBatch(torch.tensor([[y]]), torch.ones(1, 1), torch.log(torch.tensor([[pt[y]]])), torch.zeros(1, 1),
                       teacher_topk_ids_BRK=t_ids, teacher_topk_logp_BRK=t_top)
        return token_terms(LossSpec(kind), s, x)[0].item()

    def coarse_kl(buckets: list[list[int]], reverse: bool) -> float:
        a = [sum(ps[v] for v in b) for b in buckets]
        b = [sum(pt[v] for v in bk) for bk in buckets]
        p, q = (a, b) if reverse else (b, a)
        return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))

    for kind, reverse in (("full_reverse_kl", True), ("forward_kl", False)):
        assert math.isclose(loss(kind, 3), coarse_kl([[0], [1], [3], [2]], reverse), rel_tol=1e-5), kind
        assert math.isclose(loss(kind, 1), coarse_kl([[0], [1], [2, 3]], reverse), rel_tol=1e-5), kind
