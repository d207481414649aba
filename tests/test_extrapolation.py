"""EffOPD's accept rule on a table of score sequences, and the extrapolation arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.extrapolation import accept, coefficient, extrapolate, is_search_step

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
])
def test_accept_rule(base, scores, comparison, want):
    assert accept(base, scores, comparison) == want


def test_parallel_scores_give_the_sequential_decision():
    """Scoring all five then applying the rule == stopping at the first failure."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        base = float(torch.rand(1, generator=gen))
        scores = [round(float(s), 1) for s in torch.rand(5, generator=gen)]
        seq_k, v = 0, base
        for k, s in enumerate(scores, 1):  # the sequential search, evaluating lazily
            if s >= v and not (s == v == 0):
                seq_k, v = k, s
            else:
                break
        assert accept(base, scores, ">=") == seq_k


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
    assert torch.allclose(full, w + 6.0 * (w - a))
