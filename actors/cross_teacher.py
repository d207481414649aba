"""The teacher's side of cross-tokenizer OPD (`core/token_alignment.py` states the estimator).

For each rollout row the teacher:
1. takes the student's response tokens and their bytes (byte-level BPE: each token's bytes through
   GPT-2's byte table; other tokenizers: each token decoded alone); special tokens are zero-width;
2. renders the row's prompt with its own chat template (`Example.raw` through the task's renderer
   with the teacher's tokenizer), and tokenizes the response text in its own tokens with their
   byte offsets, adding its own EOS where the student's response ended with the student's EOS;
3. scores its tokens (the HF scorer's micro-batched `score_responses`, or vLLM prompt log-probs:
   the same passes as the shared path);
4. aligns the two tokenizations into chunks and sets every student token's "teacher log-prob" to
       q~_i = T_c - (R_c - r_i),    R_c = sum_{j in c} r_j,
   with T_c the teacher's log-prob of chunk c's text and r the rollout's sampling log-probs, so
   the unchanged loss's per-token advantage q~_i - s_i = T_c - (s_i + sum_{j in c, j != i} r_j):
   the chunk's log-ratio r_c with the student's other tokens of the chunk at their sampling
   log-probs (equal to the learner's on an on-policy step; the learner's own s_i keeps its
   gradient path). With one token per chunk, q~_i = T_c: the shared path's teacher log-prob.
   ExOPD's reference gets the same treatment (f~_i = F_c - (R_c - r_i)), so
   lam (q~ - f~) - (s - f~) is the chunk form lam (T_c - F_c) - (S_c - F_c).

A response whose bytes are not valid UTF-8 (a multi-byte character cut by the token budget) cannot
be given to the teacher's tokenizer as text: it is decoded with replacement characters and the
whole response becomes one chunk (its end is the only boundary both share).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from core.token_alignment import Chunk, chunk_ids, chunks, teacher_chunk_logp


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_bytes(tokenizer: Any, ids: list[int]) -> list[bytes | None]:
    """Each token's bytes (None: a special token, which has no text)."""
    specials = set(tokenizer.all_special_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
    table = _byte_decoder()
    out: list[bytes | None] = []
    for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        if i in specials:
            out.append(None)
        elif byte_level:
            out.append(bytes(table[ch] for ch in piece))
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


def spans(pieces: list[bytes | None]) -> tuple[list[tuple[int, int]], bytes]:
    """Byte spans [lo, hi) of consecutive pieces (a special token: (at, at)) and the text's bytes."""
    out, at = [], 0
    for p in pieces:
        n = len(p) if p is not None else 0
        out.append((at, at + n))
        at += n
    return out, b"".join(p for p in pieces if p is not None)


def char_to_byte_offsets(text: str, offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """A fast tokenizer's character offsets as byte offsets of the UTF-8 text."""
    at = [0]
    for ch in text:
        at.append(at[-1] + len(ch.encode("utf-8")))
    return [(at[lo], at[hi]) for lo, hi in offsets]


def teacher_row(teacher_tok: Any, text: bytes, student_ended: bool) -> tuple[list[int], list[tuple[int, int]], bool]:
    """The teacher's tokens of a response text with byte spans, its EOS appended when the student's
    response ended with EOS; and whether the text round-trips (valid UTF-8)."""
    try:
        s, ok = text.decode("utf-8"), True
    except UnicodeDecodeError:
        s, ok = text.decode("utf-8", "replace"), False
    enc = teacher_tok(s, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), char_to_byte_offsets(s, list(enc["offset_mapping"]))
    if student_ended:
        end = len(s.encode("utf-8"))
        ids.append(teacher_tok.eos_token_id)
        offs.append((end, end))
    return ids, offs, ok


def align_row(student_spans: list[tuple[int, int]], teacher_spans: list[tuple[int, int]], length: int,
              round_trips: bool) -> list[Chunk]:
    """Chunks of one row; a text that does not round-trip is one chunk of all its tokens."""
    if not round_trips:
        return [Chunk(0, len(student_spans), 0, len(teacher_spans), 0, length)]
    return chunks(student_spans, teacher_spans, length)


def effective_logp(chunk_R: list[int], values_C: list[float], rollout_R: torch.Tensor) -> torch.Tensor:
    """q~_i = V_c - (R_c - r_i) for every student token i of chunk c = chunk_R[i] (module docstring)."""
    n = len(chunk_R)
    ids = torch.tensor(chunk_R, dtype=torch.long)
    r = rollout_R[:n].double()
    per_chunk = torch.zeros(len(values_C), dtype=torch.float64).scatter_add_(0, ids, r)
    v = torch.tensor(values_C, dtype=torch.float64)
    return (v[ids] - (per_chunk[ids] - r)).float()


def chunk_sums(chunk_R: list[int], n_chunks: int, values_R: torch.Tensor) -> list[float]:
    """Per chunk, the sum of per-student-token values (ExOPD's reference log-probs)."""
    out = torch.zeros(n_chunks, dtype=torch.float64).scatter_add_(0, torch.tensor(chunk_R, dtype=torch.long),
                                                                  values_R[:len(chunk_R)].double())
    return out.tolist()


def score_cross(score: Callable[[dict[str, Any]], torch.Tensor], student_tok: Any, teacher_tok: Any, render: Any,
                examples: list[Any], batch: dict[str, Any], ref_logp: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"logp": q~ [B, R]} (and "ref_logp": f~ with `ref_logp`), plus "chunks" [B] (chunks per row)
    and "split" [B] (rows whose text did not round-trip): the teacher's scores of a student rollout
    batch in its own tokens (module docstring). `score(batch)`: the teacher's log-probs [B, R] of a
    batch in its tokens (the HF forward or vLLM prompt log-probs); `render(raw)`: a prompt in the
    teacher's template."""
    B = batch["response"].shape[0]
    lens = batch["response_mask"].sum(1).long().tolist()
    eos = student_tok.eos_token_id
    rows = []
    for b in range(B):
        ids = batch["response"][b, :lens[b]].tolist()
        s_spans, text = spans(token_bytes(student_tok, ids))
        t_ids, t_spans, ok = teacher_row(teacher_tok, text, bool(ids) and ids[-1] == eos)
        example = examples[int(batch["prompt_index"][b])]
        prompt = render(example.raw if example.raw is not None else example.prompt)
        p_ids = teacher_tok(prompt, add_special_tokens=False)["input_ids"]
        rows.append((p_ids, t_ids, align_row(s_spans, t_spans, len(text), ok), ok))
    t_logp = score(teacher_batch([(p, t) for p, t, _, _ in rows], teacher_tok.pad_token_id))
    out = {"logp": torch.zeros_like(batch["response_mask"], dtype=torch.float32),
           "chunks": torch.zeros(B), "split": torch.zeros(B)}
    if ref_logp is not None:
        out["ref_logp"] = torch.zeros_like(out["logp"])
    for b, (_, t_ids, aligned, ok) in enumerate(rows):
        if not lens[b]:
            continue
        ids_R = chunk_ids(aligned, lens[b])
        T_C = teacher_chunk_logp(aligned, t_logp[b, :len(t_ids)].tolist())
        out["logp"][b, :lens[b]] = effective_logp(ids_R, T_C, batch["logp"][b])
        if ref_logp is not None:
            out["ref_logp"][b, :lens[b]] = effective_logp(ids_R, chunk_sums(ids_R, len(aligned), ref_logp[b]), batch["logp"][b])
        out["chunks"][b], out["split"][b] = len(aligned), float(not ok)
    return out


def teacher_batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """The rollout layout (`core.modeling.generate`) of (prompt ids, response ids) rows in the
    teacher's tokens: prompts left-padded, responses right-padded."""
    P = max(1, max(len(p) for p, _ in rows))
    R = max(1, max(len(r) for _, r in rows))
    B = len(rows)
    prompt, pmask = torch.full((B, P), pad_id, dtype=torch.long), torch.zeros(B, P, dtype=torch.long)
    resp, rmask = torch.full((B, R), pad_id, dtype=torch.long), torch.zeros(B, R)
    for b, (p, r) in enumerate(rows):
        if p:
            prompt[b, P - len(p):], pmask[b, P - len(p):] = torch.tensor(p), 1
        if r:
            resp[b, :len(r)], rmask[b, :len(r)] = torch.tensor(r), 1.0
    return {"input_ids": torch.cat([prompt, resp], dim=1), "attention_mask": torch.cat([pmask, rmask.long()], dim=1),
            "prompt_len": P, "response": resp, "response_mask": rmask}
