"""The paper's workload at CPU size (`foresight prepare --workload math_twin`, orchestrator/twin.py):
the shipped files are what their record says, the data is verl's layout, the tokenizer is a
byte-level BPE with a Qwen-style chat template, and math-verify (not exact match) is what scores
the teacher's unreduced fractions right. The twin's end-to-end runs are in test_e2e_ray_job.py (HF)
and test_vllm.py (vLLM)."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT

TWIN = ROOT / "models" / "math_twin"


@pytest.fixture(scope="module")
def task():
    from core.config import load_config
    from core.task import build_task

    cfg = load_config(ROOT / "experiments" / "math_twin.yaml", [])
    return build_task(cfg.task, cfg.model_paths[0], cfg.rollout.max_prompt_tokens)


def test_shipped_twin_matches_its_record():
    from core.config import AdditionTask
    from orchestrator.prepare import RECIPES, WORKLOADS, sha256

    meta = json.loads((TWIN / "prepare.json").read_text())
    want = WORKLOADS["math_twin"].record(RECIPES["default"], AdditionTask())
    assert want["workload"] == "math_twin" and want["family"] == "qwen2"
    assert {k: meta[k] for k in want} == json.loads(json.dumps(want))
    for role in ("teacher", "student"):
        assert sha256(TWIN / role / "model.safetensors") == meta[role]["sha256"], role
        assert json.loads((TWIN / role / "config.json").read_text())["model_type"] == "qwen2"
    for f, digest in meta["files"].items():
        assert sha256(TWIN / f) == digest, f
    assert meta["teacher"]["test_accuracy"] >= 0.9 > 0.65 >= meta["student"]["test_accuracy"]


def test_verl_rows_and_the_chat_template(task):
    import pyarrow.parquet as pq

    from core.modeling import load_tokenizer

    row = pq.read_table(TWIN / "data" / "train.parquet").slice(0, 1).to_pylist()[0]
    assert row["prompt"][0]["role"] == "user" and row["prompt"][0]["content"].endswith("Put the final answer in \\boxed{}.")
    assert set(row) >= {"data_source", "prompt", "reward_model", "extra_info"} and "ground_truth" in row["reward_model"]
    prompt = task.train[0].prompt  # rendered by the student tokenizer's template, enable_thinking=False
    assert prompt == f"<|im_start|>user\n{row['prompt'][0]['content']}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    tok = load_tokenizer(TWIN / "student")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    thinking = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert "<think>" not in thinking  # the kwarg is what adds the empty think block
    ids = tok("What is 123+456?", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()] == list("123456")  # digits one per token
    assert tok.decode(tok("x \\frac{1}{2} é", add_special_tokens=False)["input_ids"]) == "x \\frac{1}{2} é"  # byte-level


def test_math_verify_scores_unreduced_fractions_that_exact_match_rejects(task):
    from core.task import exact_match, math_verify_reward
    from orchestrator.twin import problems

    train, _ = problems(20000, 500)
    unreduced = [(s, g) for _, g, s in train if "frac" in s and s != f"\\boxed{{{g}}}"][:20]
    assert len(unreduced) == 20
    for solution, gold in unreduced:
        assert math_verify_reward(solution, gold) == 1.0 and exact_match(solution, gold) == 0.0, (solution, gold)
    assert math_verify_reward("\\boxed{\\frac{7}{5}}", "\\frac{6}{5}") == 0.0
    assert task.reward is math_verify_reward


def test_data_and_tokenizer_rebuild_identically(tmp_path):
    """`prepare --workload math_twin` regenerates the shipped verl files byte for byte (their sha256
    in the record) and retrains the same BPE tokenizer (the weights' determinism is the SFT code
    path shared with the addition models, checked in test_e2e_opd.py)."""
    from orchestrator.prepare import sha256
    from orchestrator.twin import build

    tokenizer, sft = build(tmp_path, 20000, 500)
    meta = json.loads((TWIN / "prepare.json").read_text())
    for f, digest in meta["files"].items():
        assert sha256(tmp_path / f) == digest, f
    tokenizer.save_pretrained(tmp_path / "tok")
    got, want = (json.loads((d / "tokenizer.json").read_text()) for d in (tmp_path / "tok", TWIN / "student"))
    for key in ("model", "added_tokens", "pre_tokenizer", "decoder"):  # not the padding state SFT leaves behind
        assert got[key] == want[key], key
    assert len(sft.train) == 20000 and len(sft.test) == 500
