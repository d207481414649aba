"""Live geometry monitor: every `geometry.every` steps, diagnostics of Delta W_t = W_t - W_0.

Logged per monitored step (means over weight matrices, as in `core.geometry`):
`geometry/stable_rank`, `geometry/spectral_fro_ratio`, `geometry/top1pct_ratio`,
`geometry/update_norm/<module>` (Frobenius norm over all matrices of a module type), per layer
`geometry/layer/<i>/<module>/{update_norm,stable_rank}` (the dashboard's heatmaps), and
`geometry/sim_prev` (Sim_K of each matrix's update to the previous monitored one). At the end,
`geometry/sim_to_final` is logged at every monitored step: Sim_K(t) against the final update,
the papers' early lock-in curve. The top-K right singular vectors are kept on disk
(`<run_dir>/geometry/step*.pt`), so a resumed run still has the whole trajectory.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from core.geometry import GeometryOptions, layer_index, module_type, spectral_metrics, subspace_similarity


class GeometryMonitor:
    def __init__(self, w0: dict[str, torch.Tensor], out_dir: Path, sim_k: int = 16) -> None:
        self.w0 = {k: v.double() for k, v in w0.items() if v.dim() == 2}
        self.out_dir, self.k = out_dir, sim_k
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.opts = GeometryOptions(sim_k=sim_k)

    def _saved(self) -> list[tuple[int, Path]]:
        return sorted((int(p.stem[4:]), p) for p in self.out_dir.glob("step*.pt"))

    def observe(self, step: int, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        rows, norms_sq, bases = [], {}, {}
        layer_sq: dict[tuple[int, str], float] = {}
        layer_rank: dict[tuple[int, str], list[float]] = {}
        for name, w0 in self.w0.items():
            d = (weights[name].double() - w0).numpy()
            _, s, vt = np.linalg.svd(d, full_matrices=False)
            fro = float(np.linalg.norm(d))
            kind, layer = module_type(name), layer_index(name)
            if fro > 0:
                rows.append(spectral_metrics(s, self.opts, fro=fro, r=min(d.shape)))
                if layer is not None:
                    layer_rank.setdefault((layer, kind), []).append(rows[-1]["stable_rank"])
            norms_sq[kind] = norms_sq.get(kind, 0.0) + fro**2
            if layer is not None:
                layer_sq[(layer, kind)] = layer_sq.get((layer, kind), 0.0) + fro**2
            bases[name] = torch.from_numpy(vt[: min(self.k, vt.shape[0])].T.copy())
        prev = [p for s_, p in self._saved() if s_ < step]
        torch.save(bases, self.out_dir / f"step{step:07d}.pt")
        out = {f"geometry/update_norm/{k}": math.sqrt(v) for k, v in norms_sq.items()}
        out.update({f"geometry/layer/{i}/{k}/update_norm": math.sqrt(v) for (i, k), v in layer_sq.items()})
        out.update({f"geometry/layer/{i}/{k}/stable_rank": float(np.mean(v)) for (i, k), v in layer_rank.items()})
        for key in ("stable_rank", "spectral_fro_ratio", "top1pct_ratio", "effective_rank"):
            vals = [r[key] for r in rows if not math.isnan(r[key])]
            out[f"geometry/{key}"] = float(np.mean(vals)) if vals else math.nan
        if prev:
            out["geometry/sim_prev"] = self._mean_sim(bases, torch.load(prev[-1]))
        return out

    def _mean_sim(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        sims = [subspace_similarity(a[n].numpy(), b[n].numpy()) for n in a if n in b]
        return float(np.mean(sims)) if sims else math.nan

    def sim_to_final(self) -> list[tuple[int, float]]:
        """Sim_K(t) of every monitored step against the last monitored (final) one."""
        saved = self._saved()
        if not saved:
            return []
        final = torch.load(saved[-1][1])
        return [(step, self._mean_sim(torch.load(path), final)) for step, path in saved]
