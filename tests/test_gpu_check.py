"""The device check (`python -m benchmarks.gpu_check`) in its reduced CPU mode, with Ray, vLLM,
MLflow and Optuna made unimportable as on the GPU machine (which has only torch and transformers;
DeepSpeed travels as a wheel): the learner's GPU code path must run without them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT, TEST_ENV

pytestmark = pytest.mark.e2e

BLOCKED = ("ray", "vllm", "mlflow", "optuna")


def test_gpu_check_cpu_smoke_runs_without_ray_vllm_or_mlflow():
    code = ("import sys, runpy; [sys.modules.__setitem__(m, None) for m in %r]; "
            "sys.argv = ['gpu_check', '--cpu-smoke']; runpy.run_module('benchmarks.gpu_check', run_name='__main__')") % (BLOCKED,)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**TEST_ENV, "PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"micro_batches": 2' in proc.stdout and '"loss_tokens"' in proc.stdout
    # placed as rank 1 of a node (its one GPU is its device 0), the EffOPD identity, projection, HF top-64
    assert '"placed_as": {"LOCAL_RANK": 0, "NODE_INDEX": 1' in proc.stdout
    assert '"scored_equals_applied": true, "masters_exact": true' in proc.stdout
    assert '"grad_projection": {"hooked": 2, "skipped": 0.0' in proc.stdout and '"topk": [4, 8, 64]' in proc.stdout
