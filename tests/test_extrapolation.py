"""EffOPD's accept rule on a table of score sequences, and the extrapolation arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from core.extrapolation import accept, coefficient, extrapolate, extrapolated, is_search_step

NAN = math.nan


@pytest.mark.parametrize("base, scores, comparison, want", [
    (0.5, [0.6, 0.7, 0.65, 0.9, 0.9], ">=", 2),   # stops at the first drop, later gains ignored
    (0.5, [0.4, 0.9, 0.9, 0.9, 0.9], ">=", 0),    # first candidate fails: plain OPD
    (0.5, [0.5, 0.5, 0.4, 0.9, 0.9], ">=", 2),    # ties accept with '>='
    (0.5, [0.5, 0.5, 0.4, 0.9, 0.9], ">", 0),     # ... and reject with '>' (authors' code)
    (0.5, [0.6, 0.6, 0.7, 0.8, 0.9], ">", 1),     # '>' compares with the last accepted score
    (0.5, [0.6, 0.6, 0.7, 0.8, 0.9], ">=", 5),
    (0.0, [0.0, 0.0, 0.0, 0.0, 0.0], ">=", 0),    # zero guard: a collapsed run never jumps
    (0.0, [0.1, 0.0, 0.0, 0.0, 0.0], ">=", 1),    # ... but real gains from zero are taken
    (0.5, [0.6, NAN, 0.9, 0.9, 0.9], ">=", 1),    # unevaluated candidates end the search
    (NAN, [0.6, 0.7, 0.9, 0.9, 0.9], ">=", 0),    # a non-finite base score: keep W_t
    (0.5, [math.inf, 0.9, 0.9, 0.9, 0.9], ">=", 0),  # a non-finite candidate score is rejected
    (0.5, [0.6, -math.inf, 0.9, 0.9, 0.9], ">=", 1),
    (0.5, [], ">=", 0),                           # no candidates
])
def test_accept_rule(base, scores, comparison, want):
    assert accept(base, scores, comparison) == want


@pytest.mark.parametrize("base, scores, comparison, want", [
    (0.0, [0.0, 0.0, 0.0, 0.0, 0.0], ">=", 5),      # the paper's sequential rule: every tie accepts
    (0.0, [0.0, 0.04, 0.06, 0.0, 0.0], ">=", 3),    # ... up to the first drop (the guard stops at 0)
    (0.0, [0.0, 0.04, 0.06, 0.0, 0.0], ">", 0),     # the authors' '>': a tie is no improvement
    (1.0, [1.0, 1.0, 1.0, 1.0, 1.0], ">=", 5),      # a tie at 1.0 jumps with or without the guard
])
def test_the_papers_rule_without_the_zero_guard(base, scores, comparison, want):
    """Hand cases of the paper's rule (section 4.1: accept while V(W~_k) >= v_acc), which has no guard."""
    assert accept(base, scores, comparison, zero_guard=False) == want
    assert accept(base, scores, comparison) == (want if base > 0 or comparison == ">" else 0)


@pytest.mark.parametrize("name, moves", [
    ("model.layers.0.self_attn.q_proj.weight", True), ("model.layers.0.self_attn.o_proj.weight", True),
    ("model.layers.0.self_attn.k_proj.bias", True), ("model.layers.3.mlp.down_proj.weight", True),
    ("model.layers.3.mlp.gate_proj.weight", True),
    ("model.layers.0.post_attention_layernorm.weight", True),   # the authors' "attention" catches it
    ("model.layers.0.input_layernorm.weight", False), ("model.embed_tokens.weight", False),
    ("model.norm.weight", False), ("lm_head.weight", False),
    ("transformer.h.0.attn.c_attn.weight", True), ("transformer.h.0.ffn.fc1.weight", True),  # other namings
])
def test_attn_mlp_is_the_authors_name_rule(name, moves):
    """`_should_modify_param` (caiyuchen-ustc/EffOPD fsdp_workers.py:1106) on Qwen2 and GPT-style names."""
    assert extrapolated(name, "attn_mlp") is moves
    assert extrapolated(name, "all")


@pytest.mark.parametrize("comparison", [">=", ">"])
def test_accepted_k_satisfies_the_papers_definition(comparison):
    """Property check on random score tables (scores on a coarse grid, so ties and zeros occur):
    the accepted prefix never drops (each score >= / > the last accepted one, no 0 == 0 tie), and the
    search stopped because the next candidate failed that test or there was none."""
    better = (lambda s, v: s >= v) if comparison == ">=" else (lambda s, v: s > v)
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        base = round(float(torch.rand(1, generator=gen)) * 4) / 4
        scores = [round(float(s) * 4) / 4 for s in torch.rand(5, generator=gen)]
        k = accept(base, scores, comparison)
        accepted = [base] + scores[:k]
        for prev, cur in zip(accepted, accepted[1:]):
            assert better(cur, prev) and not (cur == prev == 0.0), (base, scores, k)
        if k < len(scores):
            nxt = scores[k]
            assert not better(nxt, accepted[-1]) or nxt == accepted[-1] == 0.0, (base, scores, k)


def test_search_steps_are_powers_of_two():
    assert [t for t in range(1, 70) if is_search_step(t)] == [1, 2, 4, 8, 16, 32, 64]
    assert [t for t in range(1, 70) if is_search_step(t, max_step=8)] == [1, 2, 4, 8]
    assert [coefficient(k) for k in range(1, 6)] == [2.0, 4.0, 6.0, 8.0, 10.0]


def test_extrapolate_is_elementwise_and_chunk_invariant():
    gen = torch.Generator().manual_seed(1)
    w, a = torch.randn(1000, generator=gen), torch.randn(1000, generator=gen)
    full = extrapolate(w, a, 6.0)
    parts = torch.cat([extrapolate(w[i:i + 137], a[i:i + 137], 6.0) for i in range(0, 1000, 137)])
    assert torch.equal(full, parts)  # bit-identical however the tensor is partitioned
    # by hand: w = (1, 2), anchor = (0.5, 3): W + 2 (W - A) = (1 + 1, 2 - 2)
    assert extrapolate(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0]), 2.0).tolist() == [2.0, 0.0]


def test_candidate_ladder_and_search_schedule():
    from pydantic import ValidationError

    from core.config import EffOPD, FixedExtrapolation

    assert EffOPD().coefficients() == [2.0, 4.0, 6.0, 8.0, 10.0]  # the paper's 2k, k = 1..5
    assert EffOPD(num_candidates=3).coefficients() == [2.0, 4.0, 6.0]
    assert EffOPD(ladder=[0.5, 1.0, 2.0, 4.0]).coefficients() == [0.5, 1.0, 2.0, 4.0]
    with pytest.raises(ValidationError, match="strictly increasing"):
        EffOPD(ladder=[1.0, 0.5])
    paper = EffOPD()
    assert [t for t in range(1, 70) if paper.searches_at(t)] == [1, 2, 4, 8, 16, 32, 64]
    every = EffOPD(schedule="every", every=25, max_search_step=60)
    assert [t for t in range(1, 100) if every.searches_at(t)] == [25, 50]
    assert FixedExtrapolation(k=2).coefficients()[-1] == 4.0


def test_leading_triple_from_partitioned_products_is_the_top_singular_triple():
    """`subspace: rank1`: D v and D^T u summed over two ranks' slices of D's flat elements (the second
    padded past the end), as the learner reduces them, give D's top singular triple."""
    from core.extrapolation import leading_triple

    g = torch.Generator().manual_seed(0)
    rows, cols = 7, 5
    d = (3.0 * torch.outer(torch.randn(rows, generator=g), torch.randn(cols, generator=g))
         + 0.1 * torch.randn(rows, cols, generator=g)).double()
    flat, n = d.flatten(), -(-rows * cols // 2)  # partition_numel: 18 of 35 elements per rank

    def product(block, transpose):
        acc = torch.zeros(cols if transpose else rows, block.shape[1], dtype=torch.float64)
        for rank in range(2):
            e = torch.arange(rank * n, min((rank + 1) * n, rows * cols))
            r, c = e // cols, e % cols
            d = flat[e][:, None]
            acc.index_add_(0, c, d * block[r]) if transpose else acc.index_add_(0, r, d * block[c])
        return acc

    u, s, v = leading_triple(lambda x: product(x, False), lambda y: product(y, True), rows, cols, seed=1)
    U, S, Vh = torch.linalg.svd(d)
    assert s == pytest.approx(float(S[0]), rel=1e-9)
    assert torch.allclose(s * torch.outer(u, v), S[0] * torch.outer(U[:, 0], Vh[0]), atol=1e-9)
    zero = leading_triple(lambda x: torch.zeros(rows, x.shape[1], dtype=torch.float64),
                          lambda y: torch.zeros(cols, y.shape[1], dtype=torch.float64), rows, cols, seed=1)
    assert zero[1] == 0.0
