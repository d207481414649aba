"""Interventions on constructed updates, and the CLI on the embedded student."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import foresight
from orchestrator.interventions import beta, embedding, rank, scale, window


def states(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{m}" for i in range(20)
                                             for m in ("mlp.up_proj.weight", "self_attn.q_proj.weight")]
    w0 = {n: torch.randn(8, 6, generator=gen, dtype=torch.float64) for n in names}
    w0["model.norm.weight"] = torch.ones(6, dtype=torch.float64)
    wf = {n: w + 0.1 * torch.randn(w.shape, generator=gen, dtype=torch.float64) for n, w in w0.items()}
    return w0, wf


def test_scale_endpoints_and_midpoint():
    w0, wf = states()
    assert all(torch.equal(scale(w0, wf, 0.0)[k], w0[k]) for k in w0)
    assert all(torch.allclose(scale(w0, wf, 1.0)[k], wf[k]) for k in w0)
    mid = scale(w0, wf, 0.5)
    assert all(torch.allclose(mid[k], (w0[k] + wf[k]) / 2) for k in w0)


def test_beta_rescales_each_module_type_to_the_final_norm():
    w0, wf = states()
    early = scale(w0, wf, 0.1)
    out = beta(w0, early, wf, 1.0)
    for kind in ("mlp", "q_proj"):
        keys = [k for k in w0 if kind in k]
        n_out = sum(float((out[k] - w0[k]).pow(2).sum()) for k in keys) ** 0.5
        n_fin = sum(float((wf[k] - w0[k]).pow(2).sum()) for k in keys) ** 0.5
        assert n_out == pytest.approx(n_fin)
    assert torch.allclose(out["model.layers.3.mlp.up_proj.weight"], wf["model.layers.3.mlp.up_proj.weight"])


def test_rank_keeps_components_at_equal_norm():
    w0, wf = states()
    full = rank(w0, wf, 100.0)
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(full[key], wf[key])
    top = rank(w0, wf, 10.0, "top")  # 6 singular values -> one kept
    d = top[key] - w0[key]
    assert torch.linalg.matrix_rank(d) == 1
    assert float(d.norm()) == pytest.approx(float((wf[key] - w0[key]).norm()))
    bottom = rank(w0, wf, 10.0, "bottom")
    u, s, vh = torch.linalg.svd(wf[key] - w0[key], full_matrices=False)
    db = bottom[key] - w0[key]
    assert abs(float(vh[-1] @ db.T @ u[:, -1])) == pytest.approx(float(db.norm()))  # the last component only


def test_window_and_embedding():
    w0, wf = states()
    out = window(w0, wf, "mlp", center=10, radius=8)
    for i in range(20):
        mlp, q = f"model.layers.{i}.mlp.up_proj.weight", f"model.layers.{i}.self_attn.q_proj.weight"
        assert torch.equal(out[mlp], wf[mlp] if abs(i - 10) <= 8 else w0[mlp])
        assert torch.equal(out[q], w0[q])
    emb = embedding(w0, wf)
    assert torch.equal(emb["model.embed_tokens.weight"], wf["model.embed_tokens.weight"])
    assert torch.equal(emb["model.layers.0.mlp.up_proj.weight"], w0["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.e2e
def test_intervene_cli_on_the_embedded_student(models, tmp_path):
    final = tmp_path / "final"
    shutil.copytree(models / "student", final)
    w = load_file(str(final / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in w.items()}, str(final / "model.safetensors"))
    out = foresight("intervene", "scale", "--base", str(models / "student"), "--final", str(final), "--values", "0,1",
                    "--examples", "200", "--uri", f"sqlite:///{tmp_path / 'm.db'}")
    lines = [l for l in out.stdout.splitlines() if l.startswith("scale")]
    meta_acc = float(lines[0].split()[-1])
    assert len(lines) == 2 and 0.25 <= meta_acc <= 0.65  # alpha = 0 is the student itself
