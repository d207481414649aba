"""Cross-tokenizer scoring (actors/cross_teacher.py) and the tokenizer check (plan_checks.check_models):
hand cases of the per-token values the unchanged loss receives, byte offsets of multi-byte text, the
identity (the same tokenizer on the cross path gives the shared path's teacher and reference
log-probs bit for bit wherever the teacher's tokenization of the text is the student's own), and
which losses the plan accepts across tokenizers."""

from __future__ import annotations

import shutil

import pytest
import torch

from actors.cross_teacher import char_to_byte_offsets, effective_logp, score_cross, spans, token_bytes
from actors.rollout import RolloutWorker
from actors.teacher import TeacherScorer, cross_context, scoring_budget
from conftest import ROOT
from core.config import ConfigError, load_config
from core.data_order import batch_indices
from core.losses import LossSpec, TokenBatch, advantage
from core.modeling import score_responses
from orchestrator.actor_spec import actor_config
from orchestrator.plan import resolve

TWIN = ROOT / "experiments" / "math_twin.yaml"


def twin_cfg(twin_models, tmp_path, *overrides: str, teacher=None):
    return load_config(TWIN, [f"models.student={twin_models / 'student'}", f"models.teacher={teacher or twin_models / 'teacher'}",
                              f"run.output_dir={tmp_path}", "learner.world_size=1", *overrides])


def test_each_token_carries_its_chunks_log_ratio_through_the_unchanged_loss():
    # student tokens 0,1 form chunk 0 (teacher log-prob -3.0 for its text), token 2 is chunk 1 (-1.0)
    rollout = torch.tensor([-1.0, -0.5, -2.0])
    q = effective_logp([0, 0, 1], [-3.0, -1.0], rollout)
    assert q.tolist() == [-2.5, -2.0, -1.0]  # -3 - (-1.5 - r_i), and chunk 1 alone: its teacher value
    s = rollout.clone()  # an on-policy step: the learner's log-probs are the sampling ones
    x = TokenBatch(tokens_BR=torch.zeros(1, 3, dtype=torch.long), mask_BR=torch.ones(1, 3), teacher_logp_BR=q[None],
                   rollout_logp_BR=rollout[None])
    adv = advantage(LossSpec(), x, s[None])[0]
    assert adv.tolist() == [-1.5, -1.5, 1.0]  # r_c = T_c - S_c on every token of the chunk


def test_byte_offsets_of_multi_byte_text_and_byte_level_tokens(twin_models):
    assert char_to_byte_offsets("é1€", [(0, 1), (1, 2), (2, 3)]) == [(0, 2), (2, 3), (3, 6)]
    from core.modeling import load_tokenizer

    tok = load_tokenizer(twin_models / "student")
    ids = tok("\\boxed{12} é", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    pieces = token_bytes(tok, ids)
    assert pieces[-1] is None  # EOS: no text, zero width at the end
    s, text = spans(pieces)
    assert text == "\\boxed{12} é".encode() and s[-1] == (len(text), len(text))
    assert all(hi >= lo for lo, hi in s) and s[0][0] == 0


def test_the_same_tokenizer_on_the_cross_path_gives_the_shared_paths_scores_exactly(twin_models, tmp_path):
    cfg = twin_cfg(twin_models, tmp_path)
    acfg = actor_config(cfg)
    batch = RolloutWorker(acfg).generate(1, batch_indices(1, 1000, 32, 0), None)
    teacher = TeacherScorer(acfg)
    shared = teacher.score(batch, ref=True)
    student_tok, teacher_tok, render, examples = cross_context(acfg)
    budget = scoring_budget(acfg)
    cross = score_cross(lambda tb: score_responses(teacher.model, tb, **budget)["logp"], student_tok, teacher_tok, render,
                        examples, batch, ref_logp=shared["ref_logp"])
    lens = batch["response_mask"].sum(1).long()
    canonical = []  # rows whose text the tokenizer encodes back into the very tokens the student sampled
    for b in range(len(lens)):
        ids = batch["response"][b, :lens[b]].tolist()
        body = ids[:-1] if ids and ids[-1] == student_tok.eos_token_id else ids
        try:
            text = b"".join(p for p in token_bytes(student_tok, body) if p is not None).decode("utf-8")
        except UnicodeDecodeError:
            canonical.append(False)
            continue
        canonical.append(student_tok(text, add_special_tokens=False)["input_ids"] == body)
    single = (cross["chunks"] == lens).tolist()
    assert single == canonical and sum(canonical) >= len(canonical) // 2, (single, canonical)
    rows = torch.tensor(canonical)
    for key in ("logp", "ref_logp"):
        assert torch.equal(cross[key][rows], shared[key][rows]), key


def test_the_plan_takes_the_cross_path_for_the_sampled_token_loss_and_refuses_the_rest(twin_models, tmp_path):
    from orchestrator.twin import build_tokenizer

    other = tmp_path / "teacher_other_tokenizer"
    shutil.copytree(twin_models / "teacher", other)
    corpus = ["user\nWhat is 12+34? Put the final answer in \\boxed{}.", "assistant\n\\boxed{46}"] * 50
    build_tokenizer(corpus, vocab_size=280).save_pretrained(other)
    cross = twin_cfg(twin_models, tmp_path, "loss.type=pg_reverse_kl", teacher=other)
    plan = resolve(cross, TWIN, cpus=2)
    assert plan.cross_tokenizer and actor_config(cross, plan)["cross_tokenizer"]
    assert any(n.startswith("cross-tokenizer OPD: vocabularies differ") for n in plan.notes)
    for overrides, key in ((["loss.type=full_reverse_kl"], "loss.type"),
                           (["loss.type=pg_reverse_kl", "loss.teacher_topk=8"], "loss.teacher_topk"),
                           (["loss.type=pg_reverse_kl", "rollout.source=teacher"], "rollout.source")):
        with pytest.raises(ConfigError) as err:
            resolve(twin_cfg(twin_models, tmp_path, *overrides, teacher=other), TWIN, cpus=2)
        assert err.value.key == key and "different tokenizer" in err.value.reason
    same = resolve(twin_cfg(twin_models, tmp_path, "loss.type=pg_reverse_kl"), TWIN, cpus=2)
    assert not same.cross_tokenizer and not actor_config(twin_cfg(twin_models, tmp_path), same)["cross_tokenizer"]
