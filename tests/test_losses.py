"""OPD losses and advantages against a hand-computed example."""

from __future__ import annotations

import math

import torch

from orchestrator.losses import LossInputs, opd_loss


def example(**kw) -> LossInputs:
    # one sequence, two response tokens, vocabulary of 3
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], requires_grad=True)
    teacher_full = torch.log_softmax(torch.tensor([[[0.0, 2.0, 0.0], [0.0, 0.0, 3.0]]]), -1)
    tokens = torch.tensor([[0, 1]])
    base = dict(logits_BRV=logits, tokens_BR=tokens, mask_BR=torch.tensor([[1.0, 1.0]]),
                teacher_logp_BR=teacher_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
                rollout_logp_BR=torch.log_softmax(logits.detach(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
                teacher_logp_BRV=teacher_full, norm=2.0)
    base.update(kw)
    return LossInputs(**base)


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


def test_advantage_is_detached_and_scaled():
    loss1, _ = opd_loss("pg_reverse_kl", example())
    loss2, _ = opd_loss("pg_reverse_kl", example(adv_scale=1.25))
    assert math.isclose(loss2.item(), 1.25 * loss1.item(), rel_tol=1e-6)


def test_full_reverse_and_forward_kl():
    x = example()
    loss, _ = opd_loss("full_reverse_kl", x)
    ps = torch.softmax(x.logits_BRV.detach(), -1)
    lps, lpt = ps.log(), x.teacher_logp_BRV
    assert math.isclose(loss.item(), (ps * (lps - lpt)).sum().item() / 2, rel_tol=1e-6)
    loss_f, _ = opd_loss("forward_kl", example())
    assert math.isclose(loss_f.item(), (lpt.exp() * (lpt - lps)).sum().item() / 2, rel_tol=1e-6)


def test_importance_ratio_is_clipped():
    x = example()
    # rollout thought token 0 was far less likely than the learner does: ratio e^3 > 5 -> clipped
    x.rollout_logp_BR = x.rollout_logp_BR - torch.tensor([[3.0, 0.0]])
    loss, stats = opd_loss("pg_reverse_kl", x)
    assert stats["is_clipped_sum"] == 1.0
    off, _ = opd_loss("pg_reverse_kl", example(rollout_logp_BR=x.rollout_logp_BR, importance_correction=False))
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
    from orchestrator.losses import grpo_advantages

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
    from orchestrator.losses import sparsify

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
