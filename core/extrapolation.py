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


RANK1_ITERS = 16
RANK1_BLOCK = 8
"""Subspace iterations and block width for a matrix's leading singular triple: the top vector's
error shrinks as (s_{b+1} / s_1)^(2 iters), so a small gap between s_1 and s_2 costs nothing."""


def leading_triple(matmul, rmatmul, rows: int, cols: int, seed: int, iters: int = RANK1_ITERS,
                   block: int = RANK1_BLOCK) -> tuple[torch.Tensor, float, torch.Tensor]:
    """(u1, s1, v1) of a matrix D given only D V and D^T U for blocks of vectors (each may be a sum
    over partitions reduced across ranks): subspace iteration from a seeded start, V <- orth(D^T
    orth(D V)), then the small SVD of D V = P S Q^T gives u1 = P[:, 0], s1 = S[0], v1 = V Q[:, 0]
    (Halko et al.'s range finder). The rank-1 jump moves a matrix by c s1 u1 v1^T."""
    b = max(1, min(block, rows, cols))
    g = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(cols, b, generator=g, dtype=torch.float64)).Q
    for _ in range(iters):
        u = torch.linalg.qr(matmul(v)).Q
        v = torch.linalg.qr(rmatmul(u)).Q
    p, sv, qh = torch.linalg.svd(matmul(v), full_matrices=False)
    if float(sv[0]) == 0.0:  # D = 0: no direction
        return p[:, 0], 0.0, v[:, 0]
    return p[:, 0], float(sv[0]), v @ qh[0].to(v)


DIRECTION_GROUPS = ("attention", "mlp", "embedding", "other")


def direction_group(name: str) -> str:
    """The parameter group a tensor's direction statistics add to: attention (q/k/v/o projections
    and their biases), mlp, embedding (embed_tokens, lm_head), other (norms)."""
    from core.geometry import module_type

    kind = module_type(name)
    return "attention" if kind.startswith("attention") else kind if kind in ("mlp", "embedding") else "other"


def direction_metrics(sums: dict[str, tuple[float, float, float]], first: bool) -> dict[str, float]:
    """Whether the direction EffOPD extrapolates along holds from one search to the next.

    At search n the direction is Delta_n = W_t - anchor (the training since the last accepted point).
    `sums[g]` = (<Delta_{n-1}, Delta_n>, ||Delta_{n-1}||^2, ||Delta_n||^2) over parameter group g,
    summed over every rank's partitions. Per group and over `all`:
        direction/cos/<g>        = <Delta_{n-1}, Delta_n> / (||Delta_{n-1}|| ||Delta_n||)
        direction/norm_ratio/<g> = ||Delta_n|| / ||Delta_{n-1}||
        direction/norm/<g>       = ||Delta_n||
    At the first search (`first`: no Delta_{n-1}) only the norms. A group whose norms are 0 is left out."""
    total = tuple(sum(v[i] for v in sums.values()) for i in range(3))
    out: dict[str, float] = {}
    for g, (dot, prev, new) in {**sums, "all": total}.items():
        if new > 0:
            out[f"direction/norm/{g}"] = math.sqrt(new)
        if not first and prev > 0 and new > 0:
            out[f"direction/cos/{g}"] = dot / math.sqrt(prev * new)
            out[f"direction/norm_ratio/{g}"] = math.sqrt(new / prev)
    return out
