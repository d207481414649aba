"""Cross-tokenizer alignment (`core/token_alignment.py`): chunks and advantages computed by hand."""

from __future__ import annotations

import pytest

from core.token_alignment import Chunk, chunk_advantages, chunks


def spans(pieces: list[bytes]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for p in pieces:
        out.append((pos, pos + len(p)))
        pos += len(p)
    return out


def test_identical_tokenizations_give_the_shared_vocabulary_advantages_exactly():
    s = spans([b"12", b"3", b"+4"])
    aligned = chunks(s, s, 5)
    assert [(c.s0, c.s1, c.t0, c.t1) for c in aligned] == [(0, 1, 0, 1), (1, 2, 1, 2), (2, 3, 2, 3)]
    student, teacher = [-1.0, -0.5, -2.0], [-0.25, -0.75, -1.0]
    assert chunk_advantages(aligned, student, teacher) == [t - s for s, t in zip(student, teacher)]


def test_chunks_cross_token_boundaries_until_both_share_one():
    # "123+45": student 12|3+|45, teacher 1|23|+|45: shared boundaries at bytes 4 and 6
    student, teacher = spans([b"12", b"3+", b"45"]), spans([b"1", b"23", b"+", b"45"])
    aligned = chunks(student, teacher, 6)
    assert aligned == [Chunk(0, 2, 0, 3, 0, 4), Chunk(2, 3, 3, 4, 4, 6)]
    s_lp, t_lp = [-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3, -0.4]
    r0, r1 = (-0.1 - 0.2 - 0.3) - (-1.0 - 2.0), -0.4 - (-0.5)
    assert chunk_advantages(aligned, s_lp, t_lp) == pytest.approx([r0, r0, r1])
    assert sum({c.s0: a for c, a in zip(aligned, [r0, r1])}.values()) == pytest.approx(sum(t_lp) - sum(s_lp))


def test_multi_byte_characters_split_by_a_byte_level_tokenizer():
    text = "é1".encode()  # c3 a9 31
    student = spans([text[:1], text[1:2], text[2:]])  # byte-level: the character in two tokens
    teacher = spans(["é".encode(), b"1"])
    assert chunks(student, teacher, 3) == [Chunk(0, 2, 0, 1, 0, 2), Chunk(2, 3, 1, 2, 2, 3)]
    # a fast tokenizer reporting both halves of the character with the character's span
    overlapping = [(0, 2), (0, 2), (2, 3)]
    assert chunks(overlapping, teacher, 3) == [Chunk(0, 2, 0, 1, 0, 2), Chunk(2, 3, 1, 2, 2, 3)]


def test_special_tokens_are_chunks_of_their_own_and_eos_meets_the_teachers_eos():
    student = [(0, 1), (1, 1), (1, 2), (2, 2)]  # a | <sep> | b | <eos>
    teacher = [(0, 2), (2, 2)]  # ab | <eos>: the teacher has no <sep>; bytes 0-2 are one chunk for it
    aligned = chunks(student, teacher, 2)
    # the student's mid-chunk special token stays inside the text chunk; its EOS meets the teacher's
    assert aligned == [Chunk(0, 3, 0, 1, 0, 2), Chunk(3, 4, 1, 2, 2, 2)]
    s_lp, t_lp = [-1.0, -0.1, -2.0, -0.3], [-2.5, -0.2]
    assert chunk_advantages(aligned, s_lp, t_lp) == pytest.approx([-2.5 + 3.1] * 3 + [-0.2 + 0.3])
    # a teacher special token with no student one at its offset joins the text chunk it sits in
    assert chunks([(0, 2)], [(0, 1), (1, 1), (1, 2)], 2) == [Chunk(0, 1, 0, 3, 0, 2)]
    assert chunks([(0, 1), (1, 2)], [(0, 1), (1, 1), (1, 2)], 2) == [Chunk(0, 1, 0, 1, 0, 1), Chunk(1, 2, 1, 3, 1, 2)]
    # ...and after the last byte, with no EOS sampled, it reaches no student token
    assert chunks([(0, 2)], [(0, 2), (2, 2)], 2) == [Chunk(0, 1, 0, 1, 0, 2)]


def test_text_one_tokenizer_cannot_round_trip_joins_the_next_shared_boundary():
    # the teacher's offsets skip byte 1 (not round-tripped): no boundary at 2 for it
    student, teacher = spans([b"a", b"b", b"c"]), [(0, 1), (2, 3)]
    assert chunks(student, teacher, 3) == [Chunk(0, 1, 0, 1, 0, 1), Chunk(1, 3, 1, 2, 1, 3)]


def test_batch_advantages_with_identical_tokenizers_are_the_shared_paths_bit_for_bit():
    import torch

    from core.token_alignment import batch_advantages, chunk_ids, teacher_chunk_logp

    g = torch.Generator().manual_seed(0)
    s_lp, t_lp = -torch.rand(2, 5, generator=g), -torch.rand(2, 5, generator=g)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2])
    s = spans([b"ab", b"c", b"d", b"ef", b"g"])
    aligned = chunks(s, s, 7)
    ids = torch.tensor([chunk_ids(aligned, 5)] * 2)
    teacher = torch.tensor([teacher_chunk_logp(aligned, t_lp[b].tolist()) for b in range(2)], dtype=t_lp.dtype)
    got = batch_advantages(s_lp, ids, teacher, mask)
    assert torch.equal(got, (t_lp - s_lp) * mask)
    # across tokenizers: every token of a chunk carries the chunk's log-ratio
    student, other = spans([b"12", b"3+", b"45"]), spans([b"1", b"23", b"+", b"45"])
    aligned = chunks(student, other, 6)
    s1, t1 = torch.tensor([[-1.0, -2.0, -0.5]]), [-0.1, -0.2, -0.3, -0.4]
    got = batch_advantages(s1, torch.tensor([chunk_ids(aligned, 3)]), torch.tensor([teacher_chunk_logp(aligned, t1)]),
                           torch.ones(1, 3))
    assert got.tolist()[0] == pytest.approx(chunk_advantages(aligned, s1[0].tolist(), t1))
