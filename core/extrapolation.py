"""EffOPD's extrapolation math and accept rule (paper section 4.1), shared by learner and evaluators.

At steps t = 2^n the direction is Delta_n = W_t - A, where the anchor A is the accepted point of
the previous search (W_0 before the first). Candidates are
    W~_k = W_t + 2k * Delta_n,   k = 1..K.
Accept rule with V the validation score: W_acc = W_t, v_acc = V(W_t); for k = 1..K in order,
if V(W~_k) >= v_acc (or '>') accept (W_acc, v_acc <- W~_k, V(W~_k)), else stop.
Scoring every candidate in parallel and then applying this rule gives the same decision as the
sequential search, because the rule only reads the scores in order.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


def extrapolate(w: torch.Tensor, anchor: torch.Tensor, coef: float) -> torch.Tensor:
    """w + coef * (w - anchor). The one expression every process uses, so results are bit-identical."""
    return w + coef * (w - anchor)


AUTHORS_KEYWORDS = ("attn", "self_attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj",
                    "mlp", "feed_forward", "ffn", "gate_proj", "up_proj", "down_proj")
"""The authors' `_should_modify_param` (caiyuchen-ustc/EffOPD, verl/workers/fsdp_workers.py:1106): a
parameter is extrapolated when its lower-cased name contains one of these. On Qwen2/Llama names that
is every `self_attn.*` and `mlp.*` tensor and, through "attention", `post_attention_layernorm`; not
`embed_tokens`, `input_layernorm`, the final `norm` or `lm_head`."""


def extrapolated(name: str, params: str) -> bool:
    """Whether parameter `name` moves in a jump: `all`, or `attn_mlp` (the authors' rule above)."""
    return params == "all" or any(k in name.lower() for k in AUTHORS_KEYWORDS)


def is_search_step(step: int, max_step: int | None = None) -> bool:
    """True at t = 1, 2, 4, 8, ... (and t <= max_step when given)."""
    return step >= 1 and (step & (step - 1)) == 0 and (max_step is None or step <= max_step)


def coefficient(k: int) -> float:
    """Candidate k sits at W_t + 2k * Delta."""
    return 2.0 * k


@dataclass
class Decision:
    step: int
    base_score: float
    scores: list[float]
    """V(W~_k) for k = 1..K (NaN where not evaluated)."""
    accepted_k: int
    comparison: str
    accepted_coef: float = 0.0
    """c_k of the accepted candidate (0: W_t kept)."""

    def to_dict(self) -> dict:
        return asdict(self)


def accept(base: float, scores: list[float], comparison: str = ">=", zero_guard: bool = True) -> int:
    """Sequential accept rule; returns the accepted k (0 = keep W_t).

    With `zero_guard` (Foresight's default) ties at zero never accept: with '>=' a collapsed run
    (every score 0) would otherwise jump to the largest candidate at every search and run away. The
    paper's rule has no guard (`zero_guard=False`). A non-finite score (NaN: not evaluated; inf: a
    broken candidate) ends the search; a non-finite base keeps W_t.
    """
    best, v_acc = 0, base
    if not math.isfinite(base):
        return 0
    for k, score in enumerate(scores, start=1):
        if not math.isfinite(score):  # unevaluated (NaN) or broken (inf): the search ends here
            break
        better = score > v_acc if comparison == ">" else score >= v_acc
        if better and not (zero_guard and score == v_acc == 0.0):
            best, v_acc = k, score
        else:
            break
    return best
