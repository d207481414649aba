"""Weight-space interventions on a trained update Delta = W_final - W_0 (both papers).

Each returns a full state dict; `foresight intervene KIND ...` evaluates it on the task and logs
the accuracy to MLflow. Only 2-D weight matrices are edited unless stated.

- `scale`:     W_0 + alpha * Delta, alpha in [0, 1] (EffOPD section 2)
- `beta`:      W_0 + beta * (||Delta_final,m|| / ||Delta_early,m||) * Delta_early,m per module type m
               (early checkpoint's update rescaled module-wise to the final norm; EffOPD F.4)
- `rank`:      keep the top-k% (or bottom-k%) singular components of each matrix's Delta,
               rescaled to the full update's Frobenius norm (equal-norm control; EffOPD 3.2)
- `window`:    inject Delta only into the MLP (or attention) matrices of layers within +-radius of
               a centre layer (EffOPD E.2)
- `embedding`: W_0 with the final embedding (and LM head) only
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from core.geometry import layer_index, module_type

State = dict[str, torch.Tensor]


def _matrices(w0: State) -> list[str]:
    return [k for k, v in w0.items() if v.dim() == 2]


def scale(w0: State, wf: State, alpha: float) -> State:
    return {k: w0[k] + alpha * (wf[k] - w0[k]) for k in w0}


def beta(w0: State, early: State, wf: State, beta_: float) -> State:
    out = dict(w0)
    kinds: dict[str, list[str]] = {}
    for k in _matrices(w0):
        kinds.setdefault(module_type(k), []).append(k)
    for keys in kinds.values():
        n_final = math.sqrt(sum(float((wf[k] - w0[k]).double().pow(2).sum()) for k in keys))
        n_early = math.sqrt(sum(float((early[k] - w0[k]).double().pow(2).sum()) for k in keys))
        factor = beta_ * n_final / n_early if n_early > 0 else 0.0
        for k in keys:
            out[k] = w0[k] + factor * (early[k] - w0[k])
    return out


def rank(w0: State, wf: State, percent: float, keep: str = "top") -> State:
    out = dict(wf)
    for k in _matrices(w0):
        d = (wf[k] - w0[k]).double()
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        n = max(1, math.ceil(percent * len(s) / 100))
        idx = slice(0, n) if keep == "top" else slice(len(s) - n, len(s))
        kept = (u[:, idx] * s[idx]) @ vh[idx]
        norm = float(kept.norm())
        kept = kept * (float(d.norm()) / norm) if norm > 0 else kept
        out[k] = (w0[k].double() + kept).to(w0[k].dtype)
    return out


def window(w0: State, wf: State, module: str, center: int, radius: int = 8) -> State:
    prefix = "mlp" if module == "mlp" else "attention"
    out = dict(w0)
    for k in _matrices(w0):
        li = layer_index(k)
        if li is not None and abs(li - center) <= radius and module_type(k).startswith(prefix):
            out[k] = wf[k]
    return out


def embedding(w0: State, wf: State) -> State:
    return {k: (wf[k] if module_type(k) == "embedding" else w0[k]) for k in w0}


INTERVENTIONS: dict[str, Callable[..., State]] = {
    "scale": scale, "beta": beta, "rank": rank, "window": window, "embedding": embedding,
}
