"""`foresight geometry` streams a multi-GB checkpoint one matrix at a time.

The test writes two sharded fp32 checkpoints of 1 GiB each (16 matrices of 64 MiB), runs the CLI
(randomized SVD of rank 16, the mode meant for large matrices)
in a subprocess that reports its own peak RSS, and compares that peak with the same command on a
one-matrix checkpoint and on a 64x64 one (the process itself): the per-matrix working set and
what the extra 15 matrices cost must both stay small multiples of one matrix (a loader that held
a whole checkpoint would add >= 1 GiB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, TEST_ENV

ROWS, COLS = 2048, 8192          # 16.8M entries: 64 MiB in fp32, 128 MiB in float64
MATRIX_BYTES = ROWS * COLS * 4
# VmHWM: this process image's peak RSS (ru_maxrss would carry the forking parent's peak across exec)
RUN_AND_REPORT_PEAK = (
    "import sys; from orchestrator.cli import main; rc = main(sys.argv[1:]); "
    "print('PEAK_KB', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))); sys.exit(rc)"
)


def write_checkpoints(root, n_matrices: int, per_shard: int, shape: tuple[int, int] = (ROWS, COLS)) -> None:
    """base W_0 (random) and updated W_0 + a rank-4 update, sharded like an HF checkpoint."""
    gen = torch.Generator().manual_seed(0)
    for tag in ("base", "updated"):
        (root / tag).mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for first in range(0, n_matrices, per_shard):
        shard_name = f"model-{first // per_shard + 1:05d}.safetensors"
        base, updated = {}, {}
        for i in range(first, min(first + per_shard, n_matrices)):
            name = f"model.layers.{i}.mlp.up_proj.weight"
            w0 = torch.randn(*shape, generator=gen)
            delta = 1e-2 * torch.randn(shape[0], 4, generator=gen) @ torch.randn(4, shape[1], generator=gen)
            base[name], updated[name] = w0, w0 + delta
            weight_map[name] = shard_name
        save_file(base, str(root / "base" / shard_name))
        save_file(updated, str(root / "updated" / shard_name))
        del base, updated
    for tag in ("base", "updated"):
        (root / tag / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def peak_rss(root, out) -> tuple[int, dict]:
    cmd = [sys.executable, "-c", RUN_AND_REPORT_PEAK, "geometry", "--base", str(root / "base"),
           "--updated", str(root / "updated"), "--out", str(out), "--svd", "randomized", "--rotation-k", "16", "--mask-rank", "16"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **TEST_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_kb = int(proc.stdout.split("PEAK_KB")[1].split()[0])
    return peak_kb * 1024, json.loads(out.read_text())


@pytest.mark.e2e
@pytest.mark.scale  # a real-size (2 GiB) checkpoint: make test-scale
def test_geometry_streams_a_multi_gb_checkpoint_in_bounded_memory(tmp_path):
    write_checkpoints(tmp_path / "small", n_matrices=1, per_shard=1, shape=(64, 64))
    write_checkpoints(tmp_path / "one", n_matrices=1, per_shard=1)
    write_checkpoints(tmp_path / "big", n_matrices=16, per_shard=4)
    size = sum(f.stat().st_size for f in (tmp_path / "big" / "updated").glob("*.safetensors"))
    assert size >= 1024**3  # a GiB checkpoint and its base of the same size: 2 GiB streamed

    imports, _ = peak_rss(tmp_path / "small", tmp_path / "small.json")  # the process itself
    baseline, _ = peak_rss(tmp_path / "one", tmp_path / "one.json")
    peak, report = peak_rss(tmp_path / "big", tmp_path / "big.json")

    assert len(report["matrices"]) == 16
    m = report["matrices"]["model.layers.15.mlp.up_proj.weight"]
    assert 1.0 <= m["stable_rank"] <= 4.0  # the rank-4 update is seen as low-rank
    growth, working_set = peak - baseline, baseline - imports
    print(f"checkpoint {size / 2**30:.2f} GiB; peak RSS {peak / 2**20:.0f} MiB; one-matrix run {baseline / 2**20:.0f} MiB; "
          f"process without data {imports / 2**20:.0f} MiB; per-matrix working set {working_set / MATRIX_BYTES:.2f} "
          f"fp32 matrices; growth from 1 to 16 matrices {growth / MATRIX_BYTES:.2f} fp32 matrices")
    # measured here: working set 6.2 fp32 matrices (W_0, W_+ and ~2 float64 matrices), growth 2.4
    assert working_set < 8 * MATRIX_BYTES  # one pair: the inputs, one float64 copy + its SVD, the masks
    assert growth < 4 * MATRIX_BYTES  # 15 more matrices (2 GiB more read) cost a small constant, not 15 pairs
