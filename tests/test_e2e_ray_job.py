"""`ray job submit` against a real local Ray cluster started by this test (127.0.0.1, non-default
ports, token auth), stopped by PID. Inside the job, `foresight run` joins that cluster and runs the
paper's workload at CPU size (experiments/math_twin.yaml: verl parquet, chat template with
enable_thinking=False, math-verify, Qwen2 teacher and student, a named evaluation set) on the HF
backend, and the student's reward rises."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from actors.group import free_port
from conftest import ROOT, TEST_ENV, run_overrides
from conftest import foresight
from e2e_helpers import TWIN_SMALL_EVAL, assert_reward_rose, mlflow_run

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # answering (401 without the token): the dashboard is up
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise AssertionError(f"{url} did not come up")


def test_ray_job_submit_runs_the_math_twin_on_the_cluster(twin_models, tmp_path):
    env = {**os.environ, **TEST_ENV, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         "--num-cpus=2", "--disable-usage-stats", "--include-dashboard=true"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{dash}/api/version")
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
             "--", "foresight", "run", "experiments/math_twin.yaml", *run_overrides(twin_models, tmp_path),
             "run.steps=20", "checkpoint.every=0", "learner.world_size=1", *TWIN_SMALL_EVAL],
            env=env, capture_output=True, text=True, timeout=900)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "succeeded" in job.stdout + job.stderr
        client, runs = mlflow_run(tmp_path, "math_twin", "math_twin")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run_id = runs[0].info.run_id
        assert max(m.step for m in client.get_metric_history(run_id, "train/loss")) == 20
        for key in ("eval/held/accuracy", "eval/held/mean_at_4", "eval/held/pass_at_4"):  # eval.sets
            assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 20], key
        params = runs[0].data.params
        assert params["data/eval_held_prompts"] == "40" and params["data/overlong_dropped_train"] == "0"
        assert params["task/format"] == "verl" and params["task/chat_template_kwargs/enable_thinking"] == "False"
        assert_reward_rose(client, run_id)
        dash = foresight("dashboard", "math_twin", "--uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                         "--experiment", "math_twin", "--out", str(tmp_path / "dash"), "--metric", "eval/held/mean_at_4")
        assert "target metric: eval/held/mean_at_4" in dash.stdout
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
