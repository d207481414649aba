"""Cross-tokenizer on-policy distillation: align a response's two tokenizations by byte offsets and
turn per-token log-probs into per-token advantages (the sampled-token losses: `pg_reverse_kl`, ExOPD).

The student samples a response y (its tokens s_1..s_n); the teacher scores the same text in its own
tokens t_1..t_m. Both tokenizations cover the same bytes of y, so a byte offset that ends a token
in both is a shared boundary. Chunks are the spans between consecutive shared boundaries: chunk c
holds student tokens S_c and teacher tokens T_c, and

    r_c = sum_{j in T_c} log pi_T(t_j | t_<j) - sum_{i in S_c} log pi_S(s_i | s_<i)

is the chunk's log-ratio: log pi_T(text of c | prefix) - log pi_S(text of c | prefix), each model's
probability of the chunk's text along its own tokenization. Summed over chunks it is the
sequence's log pi_T(y) - log pi_S(y), the reverse KL's per-sample estimate with the sign flipped.

The estimator: every student token i in chunk c carries A_i = r_c. With REINFORCE on the chunk,
r_c grad log pi_S(text of c) = sum_{i in S_c} r_c grad log pi_S(s_i | s_<i), so the chunk's
advantage reaches each of its tokens once; when the two tokenizers are identical every chunk is one
token and A_i = log pi_T(s_i) - log pi_S(s_i): the shared-vocabulary path exactly.

Edges:
- Special tokens (no text: EOS, chat-template markers inside the response) have zero width. A
  student special token at a shared boundary is a chunk of its own, matched to the teacher's special
  tokens at the same offset (their log-probs summed; none: only the student's term); inside a chunk
  (or with no student one at that offset) a special token joins the text chunk it sits in. At the
  end of the response the student's EOS is matched to the teacher's EOS log-prob (the teacher scores
  its own EOS after the text), so "stop here" is distilled like any chunk.
- Text one tokenizer cannot round-trip (its offsets do not cover the bytes, or they overlap) has no
  usable boundaries inside: the chunk grows to the next boundary both share, at worst to the end.
- Offsets are bytes of the UTF-8 text, so a multi-byte character split across byte-level tokens
  is fine; a boundary inside a character is a boundary like any other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """Student tokens [s0, s1) and teacher tokens [t0, t1) covering the same bytes [b0, b1)."""

    s0: int
    s1: int
    t0: int
    t1: int
    b0: int
    b1: int


def boundaries(offsets: list[tuple[int, int]]) -> set[int]:
    """Byte offsets where this tokenization's text tokens end, and 0. Tokens that share bytes (a
    character split over two byte-level tokens, reported with the same span) or leave bytes
    uncovered add no boundary inside what they share or skip."""
    return {0} | {hi for lo, hi in offsets if hi > lo}


def _special(token: tuple[int, int], at: int) -> bool:
    return token[0] == token[1] == at


def chunks(student: list[tuple[int, int]], teacher: list[tuple[int, int]], length: int) -> list[Chunk]:
    """The aligned chunks of a response `length` bytes long, in order (module docstring). `student`,
    `teacher`: each token's byte span [lo, hi) in order; a special token is (b, b) where it sits.
    Every student token is in exactly one chunk. A teacher special token sits with the student's
    special tokens at its offset, else in the text chunk around or after it; after the response's
    last byte with no student special token there (no EOS sampled), it reaches no student token."""
    shared = sorted((boundaries(student) & boundaries(teacher) | {length}) - {0})
    out: list[Chunk] = []
    si = ti = b0 = 0
    for b in [*shared, None]:
        s_sp, t_sp = si, ti
        while s_sp < len(student) and _special(student[s_sp], b0):
            s_sp += 1
        while t_sp < len(teacher) and _special(teacher[t_sp], b0):
            t_sp += 1
        for k in range(si, s_sp):  # each student special token a chunk; the first takes the teacher's here
            out.append(Chunk(k, k + 1, ti if k == si else t_sp, t_sp, b0, b0))
        if s_sp > si:  # else the teacher's special tokens here open the next text chunk
            si, ti = s_sp, t_sp
        if b is None:
            break
        s_end, t_end = si, ti  # the text up to b, with any special token inside it
        while s_end < len(student) and student[s_end][1] <= b and not _special(student[s_end], b):
            s_end += 1
        while t_end < len(teacher) and teacher[t_end][1] <= b and not _special(teacher[t_end], b):
            t_end += 1
        out.append(Chunk(si, s_end, ti, t_end, b0, b))
        si, ti, b0 = s_end, t_end, b
    return [c for c in out if c.s1 > c.s0]


def chunk_advantages(aligned: list[Chunk], student_logp: list[float], teacher_logp: list[float]) -> list[float]:
    """A_i = r_c for every student token i of chunk c (module docstring), in student token order."""
    adv = [0.0] * len(student_logp)
    for c in aligned:
        r = sum(teacher_logp[c.t0:c.t1]) - sum(student_logp[c.s0:c.s1])
        for i in range(c.s0, c.s1):
            adv[i] = r
    return adv


def chunk_ids(aligned: list[Chunk], n_student: int) -> list[int]:
    """The chunk of every student token (each student token is in exactly one chunk)."""
    ids = [-1] * n_student
    for k, c in enumerate(aligned):
        for i in range(c.s0, c.s1):
            ids[i] = k
    return ids


def teacher_chunk_logp(aligned: list[Chunk], teacher_logp: list[float]) -> list[float]:
    """Per chunk, the teacher's log-prob of its text: the sum over its teacher tokens."""
    return [sum(teacher_logp[c.t0:c.t1]) for c in aligned]


def batch_advantages(student_logp_BR, chunk_BR, teacher_chunk_BC, mask_BR):
    """The learner's side, on a padded batch (torch): A[b, i] = T[b, c] - sum_{j in c} S[b, j] with
    c = chunk_BR[b, i], the student log-probs S being the learner's own (so the gradient sees the
    same values the shared path does). With one chunk per token this is T[b, i] - S[b, i] exactly."""
    import torch

    s = student_logp_BR * mask_BR
    per_chunk = torch.zeros_like(teacher_chunk_BC).scatter_add_(1, chunk_BR, s)
    return (teacher_chunk_BC - per_chunk).gather(1, chunk_BR) * mask_BR
