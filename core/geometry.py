"""Parameter-geometry diagnostics of an update Delta W = W_+ - W_0 (per weight matrix).

Definitions (geometry-of-OPD section 3.1, appendices C.3 and E; EffOPD appendix F.1), with
sigma_1 >= ... >= sigma_r the singular values of Delta W (float64 SVD, r = min(m, n)):
- spectral norm sigma_1; Frobenius norm ||Delta W||_F = sqrt(sum sigma_i^2)
- spectral/Frobenius ratio sigma_1 / ||Delta W||_F;  stable rank ||Delta W||_F^2 / sigma_1^2
- effective rank exp(-sum p_i log p_i), p_i = sigma_i / sum_j sigma_j
- top-q% subspace norm ratio sqrt(sum_{i <= ceil(q r / 100)} sigma_i^2 / sum sigma_i^2)
- Hill tail estimate over the top k values: [1/(k-1) sum_{i<k} log(sigma_i / sigma_k)]^-1
- bf16-aware sparsity: entry unchanged iff |b(w+) - b(w0)| <= eta max(|b(w0)|, |b(w+)|), b = bf16 cast
- principal-angle rotation: theta_i = arccos sigma_i(U_{0,k}^T U_{+,k}) (and V), top-k singular
  subspaces of W_0 and W_+, reported as mean / max in degrees
- normalized spectral shift ||sigma(W_+) - sigma(W_0)|| / ||sigma(W_0)||
- update-mask overlap |M_* n M_upd| / |M_upd| with M_princ = top-alpha entries of |rank-64
  reconstruction of W_0| and M_low = bottom-alpha entries of |W_0| (random baseline alpha)
- Sim_K(t) = ||V_K(t)^T V_K(end)||_F^2 / K, right singular subspaces of Delta W(t), Delta W(end)

`foresight geometry --base DIR --updated DIR [--final DIR] --out FILE.json` streams one matrix at
a time from safetensors checkpoints (sharded or not), so memory stays at a few matrices.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


@dataclass(frozen=True)
class GeometryOptions:
    top_percents: tuple[float, ...] = (1.0, 10.0)
    eta: float = 1e-3
    rotation_k: int = 512
    mask_rank: int = 64
    mask_alpha: float = 0.5
    sim_k: int = 16
    hill_k: int | None = None
    """Top singular values used by the Hill estimate (None: half of them, at least 2)."""
    svd: str = "full"
    """`full` (exact LAPACK SVDs) or `randomized` (a seeded randomized range finder of rank
    max(rotation_k, mask_rank, sim_k) with 10 oversampling and 2 power iterations, for large
    matrices). Randomized mode sees only the top singular values: spectral norm, spectral/Frobenius,
    stable rank and the top-q% ratios it covers use the exact Frobenius norm; effective rank, Hill,
    the spectral shift and top-q% ratios beyond the computed values are NaN. Measured error: benchmarks/randomized_svd_error.py
    (results/randomized_svd_error.json)."""


def singular_values(m: np.ndarray) -> np.ndarray:
    return np.linalg.svd(m, compute_uv=False)


def spectral_metrics(s: np.ndarray, opts: GeometryOptions, fro: float | None = None,
                     r: int | None = None) -> dict[str, float]:
    """Spectrum-only metrics of Delta W from its singular values (descending).

    `fro` is the exact Frobenius norm and `r` = min(m, n), for when `s` holds only the top values
    (randomized SVD): metrics that need values beyond those are NaN (null in JSON), not guessed.
    """
    s = np.asarray(s, dtype=np.float64)
    r = r or len(s)
    partial = len(s) < r
    sq = float(np.sum(s**2)) if fro is None else fro**2
    fro = math.sqrt(sq)
    out: dict[str, float] = {"spectral_norm": float(s[0]), "frobenius": fro}
    if fro == 0.0:
        return {**out, "spectral_fro_ratio": math.nan, "stable_rank": math.nan, "effective_rank": math.nan,
                **{f"top{q:g}pct_ratio": math.nan for q in opts.top_percents}, "hill_alpha": math.nan}
    out["spectral_fro_ratio"] = float(s[0]) / fro
    out["stable_rank"] = sq / float(s[0]) ** 2
    p = s / s.sum()
    p = p[p > 0]
    out["effective_rank"] = math.nan if partial else float(np.exp(-np.sum(p * np.log(p))))
    for q in opts.top_percents:
        k = max(1, math.ceil(q * r / 100))
        out[f"top{q:g}pct_ratio"] = math.nan if k > len(s) else math.sqrt(float(np.sum(s[:k] ** 2)) / sq)
    hill_k = max(2, r // 2) if opts.hill_k is None else opts.hill_k
    out["hill_alpha"] = math.nan if hill_k > len(s) else hill(s, hill_k)
    return out


def hill(s: np.ndarray, k: int | None = None) -> float:
    """Hill tail estimate over the top-k singular values (k = half of them, at least 2)."""
    k = max(2, len(s) // 2) if k is None else k
    k = min(k, len(s))
    top = s[:k]
    if k < 2 or top[-1] <= 0:
        return math.nan
    mean_log = float(np.mean(np.log(top[:-1] / top[-1])))
    return 1.0 / mean_log if mean_log > 0 else math.inf


def bf16_unchanged(w0: torch.Tensor, w1: torch.Tensor, eta: float, chunk: int = 1 << 20) -> torch.Tensor:
    """Entries whose bf16 values differ by at most eta * max(|b(w0)|, |b(w1)|) (row blocks of
    about `chunk` entries, so the temporaries stay small)."""
    out = torch.empty(w0.shape, dtype=torch.bool)
    flat0, flat1, flat_out = w0.reshape(-1), w1.reshape(-1), out.view(-1)
    for lo in range(0, flat0.numel(), chunk):
        a = flat0[lo : lo + chunk].to(torch.bfloat16).float()
        b = flat1[lo : lo + chunk].to(torch.bfloat16).float()
        flat_out[lo : lo + chunk] = (b - a).abs() <= eta * torch.maximum(a.abs(), b.abs())
    return out


def _float64(w: torch.Tensor) -> np.ndarray:
    """A fresh float64 copy (never a view of the caller's tensor)."""
    return w.detach().to(torch.float64, copy=True).numpy()


def _difference(w1: torch.Tensor, w0: torch.Tensor, chunk: int = 1 << 20) -> np.ndarray:
    """float64 W_1 - W_0, subtracting row blocks so no second full float64 matrix is made."""
    d = torch.from_numpy(_float64(w1))
    rows = max(1, chunk // max(w0.shape[-1], 1))
    for lo in range(0, w0.shape[0], rows):
        d[lo : lo + rows] -= w0[lo : lo + rows].detach().double()
    return d.numpy()


def principal_angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (degrees) between the column spaces of orthonormal a and b."""
    cos = np.linalg.svd(a.T @ b, compute_uv=False)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def subspace_similarity(v_t: np.ndarray, v_end: np.ndarray) -> float:
    """Sim_K = ||V_K(t)^T V_K(end)||_F^2 / K for orthonormal K-column bases."""
    k = v_t.shape[1]
    return float(np.sum((v_t.T @ v_end) ** 2) / k)


def top_right_basis(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k right singular vectors of a matrix as columns, [in, k] (float64 SVD)."""
    _, _, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return vh[: min(k, vh.shape[0])].T.contiguous()


def top_mask(values: torch.Tensor, alpha: float, largest: bool) -> torch.Tensor:
    """Boolean mask of exactly round(alpha * n) entries: the largest (or smallest) values, ties
    broken by position. Linear-time selection (np.partition), not a sort."""
    values = values.detach()
    flat = (values.float() if values.dtype in (torch.bfloat16, torch.float16) else values).flatten().cpu().numpy()
    n = flat.size
    k = int(round(alpha * n))
    if k in (0, n):
        return torch.full(values.shape, k == n, dtype=torch.bool)
    if largest:
        thr = np.partition(flat, n - k)[n - k]
        mask = flat > thr
    else:
        thr = np.partition(flat, k - 1)[k - 1]
        mask = flat < thr
    mask[np.flatnonzero(flat == thr)[: k - int(mask.sum())]] = True
    return torch.from_numpy(mask).view(values.shape)


def randomized_svd(m: np.ndarray, k: int, oversample: int = 10, power_iters: int = 2,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k SVD by a randomized range finder (Halko, Martinsson & Tropp 2011, alg. 4.4):
    Q = orth(A Omega), refined by `power_iters` rounds of Q <- orth(A orth(A^T Q)); then the exact
    SVD of the small B = Q^T A. Seeded; A is never copied or transposed (A^T Q = (Q^T A)^T)."""
    q = min(k + oversample, *m.shape)
    omega = np.random.default_rng(seed).standard_normal((m.shape[1], q))
    basis = np.linalg.qr(m @ omega)[0]
    for _ in range(power_iters):
        basis = np.linalg.qr(m @ np.linalg.qr((basis.T @ m).T)[0])[0]
    u_small, s, vt = np.linalg.svd(basis.T @ m, full_matrices=False)
    return (basis @ u_small[:, :k]), s[:k], vt[:k]


def _top_svd(m: np.ndarray, opts: GeometryOptions, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U_k, sigma, V_k^T) of a float64 matrix: the top-k singular vectors, and sigma the whole
    spectrum (`full`) or its top k (`randomized`).

    `full`: LAPACK SVD. `randomized`: `randomized_svd` with 10 oversampling and 2 power iterations,
    used only when min(m, n) > k + 10; its error against the exact SVD is measured by
    benchmarks/randomized_svd_error.py.
    """
    if opts.svd == "randomized" and min(m.shape) > k + 10:
        return randomized_svd(m, k)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return u[:, :k].copy(), s, vt[:k].copy()


def matrix_metrics(w0: torch.Tensor, w1: torch.Tensor, opts: GeometryOptions,
                   w_final: torch.Tensor | None = None) -> dict[str, float]:
    """Every diagnostic of one weight matrix (2-D tensors of equal shape).

    Memory: one float64 matrix is live at a time next to its SVD (plus the two boolean masks), so
    the peak is a small constant number of matrix-sized buffers, whatever the checkpoint size.
    """
    unchanged = bf16_unchanged(w0, w1, opts.eta)
    # the update Delta W = W_+ - W_0: full spectrum always, top-K right subspace only for Sim_K
    d = _difference(w1, w0)
    fro = float(np.linalg.norm(d))
    v_upd = None
    if opts.svd == "randomized" or w_final is not None:
        _, sd, vdt = _top_svd(d, opts, max(opts.rotation_k, opts.mask_rank, opts.sim_k))
        v_upd = vdt[: opts.sim_k]
    else:
        sd = singular_values(d)
    del d
    out = spectral_metrics(sd, opts, fro=fro, r=min(w0.shape))
    out["bf16_sparsity"] = float(unchanged.float().mean())
    # W_0 and W_+: top-k singular subspaces (rotation), spectra (spectral shift), masks of W_0
    k = min(opts.rotation_k, *w0.shape)
    a = _float64(w0)
    u0, s0, v0t = _top_svd(a, opts, max(k, opts.mask_rank))
    del a
    r = min(opts.mask_rank, len(s0))
    recon = (u0[:, :r] * s0[:r]) @ v0t[:r]
    recon = torch.from_numpy(np.abs(recon, out=recon)).float()  # ranked in fp32: half the memory
    princ = top_mask(recon, opts.mask_alpha, largest=True)
    del recon
    low = top_mask(w0.detach().abs(), opts.mask_alpha, largest=False)  # |W_0| orders the same in its own dtype
    b = _float64(w1)
    u1, s1, v1t = _top_svd(b, opts, k)
    del b
    ang_u, ang_v = principal_angles_deg(u0[:, :k], u1), principal_angles_deg(v0t[:k].T, v1t.T)
    out.update({"rotation_u_mean_deg": float(ang_u.mean()), "rotation_u_max_deg": float(ang_u.max()),
                "rotation_v_mean_deg": float(ang_v.mean()), "rotation_v_max_deg": float(ang_v.max())})
    full_spectra = len(s0) == len(s1) == min(w0.shape)
    out["spectral_shift"] = float(np.linalg.norm(s1 - s0) / np.linalg.norm(s0)) if full_spectra else math.nan
    update = ~unchanged
    n_upd = int(update.sum())
    out["update_density"] = n_upd / update.numel()
    out["overlap_principal"] = float((princ & update).sum()) / n_upd if n_upd else math.nan
    out["overlap_low_magnitude"] = float((low & update).sum()) / n_upd if n_upd else math.nan
    if w_final is not None:
        f = _difference(w_final, w0)
        vft = _top_svd(f, opts, opts.sim_k)[2]
        del f
        kk = min(opts.sim_k, v_upd.shape[0], vft.shape[0])
        out[f"sim{opts.sim_k}_to_final"] = subspace_similarity(v_upd[:kk].T, vft[:kk].T)
    return out


MODULE_PATTERNS = [("embedding", r"embed_tokens|wte|lm_head"), ("attention_q", r"q_proj"), ("attention_k", r"k_proj"),
                   ("attention_v", r"v_proj"), ("attention_o", r"o_proj"), ("mlp", r"mlp|gate_proj|up_proj|down_proj")]


def module_type(name: str) -> str:
    for kind, pattern in MODULE_PATTERNS:
        if re.search(pattern, name):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m[1]) if m else None


# ----------------------------------------------------------------------------- streaming
class Checkpoint:
    """Lazy reader of an HF safetensors checkpoint folder (single file or sharded)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.folder}: no *.safetensors files")
            weight_map = {}
            for f in files:
                with safe_open(str(f), "pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map = weight_map
        self._open = safe_open

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, key: str) -> torch.Tensor:
        with self._open(str(self.folder / self.weight_map[key]), "pt") as h:
            return h.get_tensor(key)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor (loads the whole checkpoint; use `get` to stream)."""
        return {k: self.get(k) for k in self.keys()}


def iter_matrices(base: Checkpoint, updated: Checkpoint, final: Checkpoint | None) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    for key in base.keys():
        if key not in updated.weight_map:
            continue
        w0 = base.get(key)
        if w0.dim() != 2:
            continue
        yield key, w0, updated.get(key), final.get(key) if final else None
        del w0  # before the next load: at most one pair is alive


@dataclass
class GeometryReport:
    """Output schema (JSON): per-matrix metrics, and means per module type, per layer and overall."""

    matrices: dict[str, dict[str, float]] = field(default_factory=dict)
    by_module: dict[str, dict[str, float]] = field(default_factory=dict)
    by_layer: dict[str, dict[str, float]] = field(default_factory=dict)
    overall: dict[str, float] = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = rows[0].keys() if rows else []
    return {k: float(np.nanmean([r[k] for r in rows])) if any(not math.isnan(r[k]) for r in rows) else math.nan
            for k in keys}


def analyze(base: Path, updated: Path, final: Path | None = None, opts: GeometryOptions = GeometryOptions(),
            progress: bool = False) -> GeometryReport:
    """Stream every 2-D weight through `matrix_metrics`; aggregate by module type and layer."""
    from tqdm.auto import tqdm

    b, u = Checkpoint(base), Checkpoint(updated)
    f = Checkpoint(final) if final else None
    report = GeometryReport(options=opts.__dict__)
    total_params = unchanged = 0
    n = sum(1 for k in b.keys() if k in u.weight_map)
    for key, w0, w1, wf in tqdm(iter_matrices(b, u, f), total=n, disable=not progress, desc="geometry", unit="tensor"):
        metrics = matrix_metrics(w0, w1, opts, wf)
        metrics["update_norm"] = metrics["frobenius"]
        report.matrices[key] = metrics
        total_params += w0.numel()
        unchanged += metrics["bf16_sparsity"] * w0.numel()
        del w0, w1, wf
    groups: dict[str, list] = {}
    layers: dict[str, list] = {}
    for key, m in report.matrices.items():
        groups.setdefault(module_type(key), []).append(m)
        li = layer_index(key)
        if li is not None:
            layers.setdefault(str(li), []).append(m)
    report.by_module = {k: _mean(v) for k, v in groups.items()}
    report.by_layer = {k: _mean(v) for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))}
    report.overall = _mean(list(report.matrices.values()))
    report.overall["bf16_sparsity_param_weighted"] = unchanged / total_params if total_params else math.nan
    return report
