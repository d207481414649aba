"""Geometry diagnostics against independent numpy/scipy computations on constructed matrices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.linalg import subspace_angles
from scipy.stats import entropy, ortho_group
from safetensors.torch import save_file

from conftest import foresight
from core.geometry import (GeometryOptions, bf16_unchanged, hill, matrix_metrics, module_type, top_mask,
                                   principal_angles_deg, spectral_metrics, subspace_similarity)

OPTS = GeometryOptions(rotation_k=8, mask_rank=4, sim_k=4)


def with_spectrum(sigma: np.ndarray, m: int, n: int, seed: int):
    u = ortho_group.rvs(m, random_state=seed)[:, : len(sigma)]
    v = ortho_group.rvs(n, random_state=seed + 1)[:, : len(sigma)]
    return (u * sigma) @ v.T, u, v


def test_spectral_metrics_on_a_known_spectrum():
    sigma = np.array([10.0, 5.0, 2.0, 1.0] + [0.5] * 96)
    d, _, _ = with_spectrum(sigma, 120, 100, 0)
    s = np.linalg.svd(d, compute_uv=False)
    got = spectral_metrics(s, GeometryOptions())
    fro = math.sqrt(float(np.sum(sigma**2)))
    assert got["spectral_norm"] == pytest.approx(10.0)
    assert got["frobenius"] == pytest.approx(fro)
    assert got["spectral_fro_ratio"] == pytest.approx(10.0 / fro)
    assert got["stable_rank"] == pytest.approx(fro**2 / 100.0)
    assert got["effective_rank"] == pytest.approx(math.exp(entropy(sigma / sigma.sum())))
    assert got["top1pct_ratio"] == pytest.approx(10.0 / fro)  # r = 100: one value
    assert got["top10pct_ratio"] == pytest.approx(math.sqrt(float(np.sum(sigma[:10] ** 2))) / fro)
    k = 50
    assert got["hill_alpha"] == pytest.approx(1.0 / np.mean(np.log(sigma[: k - 1] / sigma[k - 1])))


def test_hill_on_a_pareto_like_tail():
    s = np.arange(1, 201, dtype=float) ** (-1.0 / 3.0)  # sigma_i ~ i^(-1/alpha), alpha = 3
    assert hill(s[::1][:200], 200) == pytest.approx(3.0, rel=0.2)


def test_principal_angles_match_scipy_and_a_constructed_rotation():
    rng = np.random.default_rng(0)
    a = np.linalg.qr(rng.standard_normal((50, 6)))[0]
    b = np.linalg.qr(rng.standard_normal((50, 6)))[0]
    assert np.allclose(np.sort(principal_angles_deg(a, b)), np.sort(np.degrees(subspace_angles(a, b))), atol=1e-8)
    theta = np.radians(7.0)
    e = np.eye(50)
    rotated = np.column_stack([np.cos(theta) * e[:, 0] + np.sin(theta) * e[:, 10], e[:, 1], e[:, 2]])
    angles = np.sort(principal_angles_deg(e[:, :3], rotated))
    assert np.allclose(angles, [0.0, 0.0, 7.0], atol=1e-6)


def test_rotation_spectral_shift_and_sim_on_constructed_weights():
    sigma0 = np.linspace(10, 1, 16)
    w0, u, v = with_spectrum(sigma0, 24, 20, 3)
    sigma1 = sigma0 * 1.1
    w1 = (u * sigma1) @ v.T  # same singular vectors, scaled spectrum
    got = matrix_metrics(torch.tensor(w0), torch.tensor(w1), OPTS)
    assert got["spectral_shift"] == pytest.approx(np.linalg.norm(sigma1 - sigma0) / np.linalg.norm(sigma0), rel=1e-9)
    assert got["rotation_u_max_deg"] < 1e-4 and got["rotation_v_max_deg"] < 1e-4
    assert got["stable_rank"] == pytest.approx(np.sum(sigma0**2) / sigma0[0] ** 2, rel=1e-9)  # Delta = 0.1 W0


def test_subspace_similarity():
    e = np.eye(30)
    assert subspace_similarity(e[:, :4], e[:, :4]) == pytest.approx(1.0)
    assert subspace_similarity(e[:, :4], e[:, 4:8]) == pytest.approx(0.0)
    assert subspace_similarity(e[:, :4], e[:, 2:6]) == pytest.approx(0.5)
    # through matrix_metrics: an update whose right subspace is the final one's -> Sim = 1
    w0 = torch.zeros(12, 10, dtype=torch.float64)
    d, _, _ = with_spectrum(np.array([4.0, 3.0, 2.0, 1.0]), 12, 10, 5)
    got = matrix_metrics(w0 + 1.0, w0 + 1.0 + torch.tensor(d), OPTS, w_final=w0 + 1.0 + 3 * torch.tensor(d))
    assert got["sim4_to_final"] == pytest.approx(1.0)


def test_bf16_sparsity_and_mask_overlap():
    w0 = torch.linspace(-1, 1, 100).reshape(10, 10).double()
    w1 = w0.clone()
    w1[0, :] += 0.5                 # visible
    w1[1, :] += 1e-7                # below bf16 resolution: unchanged
    unchanged = bf16_unchanged(w0, w1, 1e-3)
    assert int((~unchanged).sum()) == 10
    got = matrix_metrics(w0, w1, OPTS)
    assert got["bf16_sparsity"] == pytest.approx(0.9)
    low = (w0.abs().flatten().argsort()[:50])
    low_mask = torch.zeros(100, dtype=torch.bool)
    low_mask[low] = True
    upd = torch.zeros(100, dtype=torch.bool)
    upd[:10] = True
    assert got["overlap_low_magnitude"] == pytest.approx(float((low_mask & upd).sum()) / 10)
    u, s, vt = np.linalg.svd(w0.numpy())
    recon = np.abs((u[:, :4] * s[:4]) @ vt[:4]).flatten()
    princ = np.zeros(100, dtype=bool)
    princ[np.argsort(-recon)[:50]] = True
    assert got["overlap_principal"] == pytest.approx(float((princ & upd.numpy()).sum()) / 10)


def test_module_types():
    assert module_type("model.layers.3.self_attn.q_proj.weight") == "attention_q"
    assert module_type("model.layers.3.mlp.down_proj.weight") == "mlp"
    assert module_type("model.embed_tokens.weight") == "embedding"


def test_cli_streams_sharded_checkpoints(tmp_path):
    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + ["model.embed_tokens.weight"]
    base = {n: torch.randn(32, 24, generator=gen) for n in names}
    for tag, scale in (("base", 0.0), ("upd", 0.01), ("final", 0.02)):
        folder = tmp_path / tag
        folder.mkdir()
        shard = {n: (w + scale * torch.ones_like(w)).contiguous() for n, w in base.items()}
        first, second = dict(list(shard.items())[:2]), dict(list(shard.items())[2:])
        save_file(first, str(folder / "model-00001-of-00002.safetensors"))
        save_file(second, str(folder / "model-00002-of-00002.safetensors"))
        index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in first},
                                **{k: "model-00002-of-00002.safetensors" for k in second}}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "geo.json"
    foresight("geometry", "--base", str(tmp_path / "base"), "--updated", str(tmp_path / "upd"),
              "--final", str(tmp_path / "final"), "--out", str(out), "--sim-k", "1")
    report = json.loads(out.read_text())
    assert set(report) == {"matrices", "by_module", "by_layer", "overall", "options"}
    assert len(report["matrices"]) == 5 and set(report["by_layer"]) == {"0", "1", "2", "3"}
    m = report["matrices"][names[0]]
    assert m["stable_rank"] == pytest.approx(1.0, abs=1e-6)  # a constant shift is rank one
    assert m["sim1_to_final"] == pytest.approx(1.0, abs=1e-6)  # the final update has the same direction
    bad = foresight("geometry", "--base", str(tmp_path / "nope"), "--updated", str(tmp_path / "upd"),
                    "--out", str(out), check=False)
    assert bad.returncode == 2 and "--base" in bad.stderr


def test_gradient_projection_hook_projects_onto_the_basis():
    """The learner's hook g <- g V V^T, on a plain parameter: the gradient lands in span(V)."""
    from core.geometry import top_right_basis

    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 3, generator=gen, dtype=torch.float64) @ torch.randn(3, 10, generator=gen, dtype=torch.float64)
    v = top_right_basis(delta, 2)
    assert v.shape == (10, 2) and torch.allclose(v.T @ v, torch.eye(2, dtype=torch.float64))
    p = torch.nn.Parameter(torch.randn(6, 10, generator=gen))
    vf = v.float()
    p.register_hook(lambda g: (g.float() @ vf @ vf.T).to(g.dtype))
    (p * torch.randn(6, 10, generator=gen)).sum().backward()
    g = p.grad.double()
    assert torch.allclose(g, g @ v @ v.T, atol=1e-5)  # already in the span: projecting again is a no-op
    assert torch.linalg.matrix_rank(g, atol=1e-5) <= 2


@pytest.mark.parametrize("largest", [True, False])
def test_top_mask_selects_exactly_k_entries_like_a_sort(largest):
    rng = np.random.default_rng(1)
    values = torch.from_numpy(np.round(rng.standard_normal((40, 30)), 1))  # many ties
    mask = top_mask(values, 0.3, largest)
    k = round(0.3 * values.numel())
    assert int(mask.sum()) == k
    chosen, rest = values[mask], values[~mask]
    assert (chosen.min() >= rest.max()) if largest else (chosen.max() <= rest.min())
