"""`ray job submit` against a real local Ray cluster started by this test (127.0.0.1, non-default
ports, token auth), stopped by PID. Inside the job, `foresight run` joins that cluster and runs a
sweep on Ray Tune over the paper's workload at CPU size (experiments/math_twin.yaml: verl parquet,
chat template with enable_thinking=False, math-verify, Qwen2 teacher and student, a named
evaluation set) on the HF backend, with two teachers routed by `data_source` (fractions to a named
one), each a shared teacher pool: the trial is an MLflow child run of the sweep's parent, the
student's reward rises, both teachers score every step, each group is evaluated, and the job leaves
the cluster without actors or placement groups (Ray's state API: the two pools' actors, and no
other teacher, all dead). (Ctrl-C /
SIGTERM, what `ray job stop` sends, is in test_e2e_sweep.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from actors.group import free_port
from conftest import ROOT, TEST_ENV, run_overrides
from conftest import foresight
from e2e_helpers import TWIN_SMALL_EVAL, assert_reward_rose, mlflow_run

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
TWIN = ROOT / "experiments" / "math_twin.yaml"


def assert_cluster_is_clean(gcs_port: int, env: dict) -> None:
    """No live actors and no placement groups left on the cluster once the job has ended."""
    probe = ("import ray, json; from ray.util.state import list_actors, list_placement_groups; "
             f"ray.init(address='127.0.0.1:{gcs_port}', logging_level='ERROR'); "
             "print(json.dumps([[a.class_name for a in list_actors(filters=[('state', '=', 'ALIVE')])], "
             "[p.state for p in list_placement_groups(filters=[('state', '!=', 'REMOVED')])]]))")
    deadline = time.time() + 60
    while True:  # a stopped job's driver may still be exiting
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        actors, groups = json.loads(out.stdout.strip().splitlines()[-1])
        if (actors == [] and groups == []) or time.time() > deadline:
            break
        time.sleep(2)
    assert actors == [] and groups == [], (actors, groups)


def state(gcs_port: int, env: dict, expression: str):
    """`expression` (over ray.util.state's list_actors) evaluated on the cluster, as JSON."""
    probe = ("import ray, json; from ray.util.state import list_actors; "
             f"ray.init(address='127.0.0.1:{gcs_port}', logging_level='ERROR'); print(json.dumps({expression}))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def routed_data(tmp_path: Path, twin_models: Path) -> dict[str, str]:
    """The twin's splits with data_source naming each problem's domain (sum or fraction)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    for split in ("train", "test"):
        rows = pq.read_table(twin_models / "data" / f"{split}.parquet").to_pylist()
        for r in rows:
            r["data_source"] = "foresight/math_twin/" + ("fraction" if "/" in r["prompt"][0]["content"] else "sum")
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{split}.parquet")
        out[f"{split}_path"] = str(tmp_path / f"{split}.parquet")
    return out


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


def test_ray_job_submit_runs_a_math_twin_sweep_on_tune(twin_models, tmp_path):
    env = {**os.environ, **TEST_ENV, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash_port = free_port(), free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         "--num-cpus=2", "--disable-usage-stats", "--include-dashboard=true"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_http(f"http://127.0.0.1:{dash_port}/api/version")
        base = yaml.safe_load(TWIN.read_text())
        # two teachers routed by data_source (fractions to a named one), both as shared pools
        base["task"].update(routed_data(tmp_path, twin_models), group_key="data_source")
        shutil.copytree(twin_models / "teacher", tmp_path / "fractions_teacher")  # its own checkpoint: its own pool
        base["models"]["teachers"] = {"fractions": str(tmp_path / "fractions_teacher")}
        base["teacher"] = {"route": {"foresight/math_twin/fraction": "fractions"}, "shared": True}
        sweep = tmp_path / "math_twin_sweep.yaml"
        sweep.write_text(yaml.safe_dump({"sweep": "math_twin", "base": base, "matrix": {"method.type": ["vanilla"]}}))
        job = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash_port}", "--working-dir", str(ROOT),
             "--", "foresight", "run", str(sweep), *run_overrides(twin_models, tmp_path),
             "run.steps=16", "checkpoint.every=0", "learner.world_size=1", *TWIN_SMALL_EVAL],
            env=env, capture_output=True, text=True, timeout=900)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
        assert "succeeded" in job.stdout + job.stderr
        assert "done: math_twin_vanilla final test accuracy" in job.stdout
        assert "Trial status: 1 TERMINATED" in job.stdout  # Tune's own table, in the job's log
        assert_cluster_is_clean(gcs, env)
        teachers = state(gcs, env, "[[a.name, a.state] for a in list_actors(filters=[('class_name', '=', 'TeacherScorer')])]")
        assert len(teachers) == 2 and all(n.startswith("math_twin-teacher-") and st == "DEAD" for n, st in teachers), teachers
        client, runs = mlflow_run(tmp_path, "math_twin_vanilla", "math_twin")
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        _, parents = mlflow_run(tmp_path, "math_twin", "math_twin")
        assert runs[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        run_id = runs[0].info.run_id
        assert max(m.step for m in client.get_metric_history(run_id, "train/loss")) == 16
        for key in ("eval/held/accuracy", "eval/held/mean_at_4", "eval/held/pass_at_4"):  # eval.sets
            assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 16], key
        params = runs[0].data.params
        assert params["data/eval_held_prompts"] == "40" and params["data/overlong_dropped_train"] == "0"
        assert params["task/format"] == "verl" and params["task/chat_template_kwargs/enable_thinking"] == "False"
        assert_reward_rose(client, run_id)
        metrics = runs[0].data.metrics
        assert metrics["route/default/rows"] > 0 and metrics["route/fractions/rows"] > 0  # every step: both teachers
        assert {"eval/group/foresight_math_twin_sum/accuracy", "eval/group/foresight_math_twin_fraction/accuracy",
                "route/fractions/reverse_kl", "route/default/reward"} <= set(metrics)
        dash = foresight("dashboard", "math_twin", "--uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                         "--experiment", "math_twin", "--out", str(tmp_path / "dash"), "--metric", "eval/held/mean_at_4")
        assert "target metric: eval/held/mean_at_4" in dash.stdout
        assert (tmp_path / "dash" / "teacher_routes.png").is_file()  # the per-teacher panel
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
