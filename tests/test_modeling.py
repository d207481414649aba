"""Shared sequence math: tokenizer, response masks, and rollout log-probs == learner log-probs."""

from __future__ import annotations

import torch

from core.modeling import (TinyArch, build_tokenizer, gather_logp, generate, init_model, response_logits,
                                   response_mask)


def test_char_tokenizer_roundtrip():
    tok = build_tokenizer()
    ids = tok.encode("123+456=", add_special_tokens=False)
    assert len(ids) == 8 and tok.decode(ids) == "123+456="


def test_response_mask_keeps_first_eos():
    eos = 2
    mask = response_mask(torch.tensor([[5, 6, eos, 0, 0], [5, eos, 7, eos, 0], [5, 6, 7, 8, 9]]), eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_sampling_logprobs_match_a_forward_pass_with_left_padding():
    tok = build_tokenizer()
    model = init_model(TinyArch(hidden=32, layers=1, heads=2, intermediate=64), tok, seed=0).eval()
    out = generate(model, tok, ["1+2=", "123+456="], 5, greedy=False, seed=3)  # ragged -> left padding
    with torch.no_grad():
        logits = response_logits(model, out["input_ids"], out["attention_mask"], out["prompt_len"])
    learner = gather_logp(torch.log_softmax(logits, -1), out["response"]) * out["response_mask"]
    assert torch.allclose(learner, out["logp"], atol=1e-5)
    again = generate(model, tok, ["1+2=", "123+456="], 5, greedy=False, seed=3)
    assert torch.equal(again["response"], out["response"])  # seeded sampling is reproducible
