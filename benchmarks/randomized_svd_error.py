"""Error and speed of `foresight geometry --svd randomized` against the exact SVD.

    python benchmarks/randomized_svd_error.py [--shape 1024x4096]

For W_0 with a power-law spectrum (like trained weights) and an update Delta W with three kinds of
spectrum (low-rank plus noise, power law, flat Gaussian: the worst case for a randomized range
finder), runs `matrix_metrics` in both modes and reports the relative error of every spectral
metric, the subspace agreement of the top-16 right singular vectors (Sim_16 of randomized vs
exact), the change in the rotation angles, and the speed-up. Writes
benchmarks/results/randomized_svd_error.json and logs it to MLflow (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.geometry import GeometryOptions, _top_svd, matrix_metrics, subspace_similarity  # noqa: E402
from step_overhead import save_result  # noqa: E402

METRICS = ["spectral_norm", "spectral_fro_ratio", "stable_rank", "top1pct_ratio", "top10pct_ratio", "effective_rank",
           "hill_alpha", "spectral_shift", "rotation_u_mean_deg", "rotation_v_mean_deg", "overlap_principal"]


def with_spectrum(sigma: np.ndarray, m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    u = np.linalg.qr(rng.standard_normal((m, len(sigma))))[0]
    v = np.linalg.qr(rng.standard_normal((n, len(sigma))))[0]
    return (u * sigma) @ v.T


def updates(m: int, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    r = min(m, n)
    i = np.arange(1, r + 1, dtype=float)
    low_rank = with_spectrum(np.array([8.0, 4.0, 2.0, 1.0] + [0.5] * 12), m, n, rng) + 0.01 * rng.standard_normal((m, n))
    return {
        "low_rank_plus_noise": 1e-3 * low_rank,
        "power_law": 1e-3 * with_spectrum(i**-1.0, m, n, rng),
        "flat_gaussian": 1e-5 * rng.standard_normal((m, n)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="1024x4096")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "randomized_svd_error.json"))
    args = parser.parse_args()
    m, n = (int(x) for x in args.shape.split("x"))
    rng = np.random.default_rng(0)
    w0 = with_spectrum(np.arange(1, min(m, n) + 1, dtype=float) ** -0.5, m, n, rng)
    full, rand = GeometryOptions(svd="full", rotation_k=64), GeometryOptions(svd="randomized", rotation_k=64)
    cases = {}
    for name, delta in updates(m, n, rng).items():
        a, b = torch.from_numpy(w0), torch.from_numpy(w0 + delta)
        t0 = time.perf_counter()
        exact = matrix_metrics(a, b, full)
        t1 = time.perf_counter()
        approx = matrix_metrics(a, b, rand)
        t2 = time.perf_counter()
        v_exact = _top_svd(delta, full, 16)[2].T
        v_rand = _top_svd(delta, rand, 80)[2][:16].T
        rel = {k: abs(approx[k] - exact[k]) / abs(exact[k]) for k in METRICS
               if exact[k] != 0.0 and np.isfinite(exact[k]) and np.isfinite(approx[k])}
        cases[name] = {
            "relative_error": rel,
            "sim16_randomized_vs_exact": subspace_similarity(v_rand, v_exact),
            "not_reported_randomized": [k for k in METRICS if not np.isfinite(approx[k])],
            "exact": {k: exact[k] for k in METRICS},
            "randomized": {k: approx[k] for k in METRICS},
            "seconds_full": t1 - t0, "seconds_randomized": t2 - t1, "speedup": (t1 - t0) / (t2 - t1),
        }
        print(f"{name:22s} spectral norm err {rel['spectral_norm']:.1e}  top-1% err {rel['top1pct_ratio']:.1e}  "
              f"stable rank err {rel['stable_rank']:.1e}  Sim16 {cases[name]['sim16_randomized_vs_exact']:.4f}  "
              f"speed-up {cases[name]['speedup']:.1f}x")
    result = {
        "benchmark": "randomized_svd_error",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "settings": {"shape": [m, n], "rotation_k": 64, "sim_k": 16, "oversampling": 10, "power_iterations": 2,
                     "w0_spectrum": "sigma_i = i^-0.5"},
        "cases": cases,
        "max_relative_error": {k: max(c["relative_error"][k] for c in cases.values())
                               for k in METRICS if all(k in c["relative_error"] for c in cases.values())},
    }
    save_result(result, args.out, "randomized_svd_error")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
