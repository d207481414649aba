"""The dashboard of a real sweep, in a real browser: 2 methods x 2 seeds of tiny runs through the
CLI (Ray actors, ZeRO-3 learner, MLflow), `foresight dashboard`, then headless Chromium opens the
page (no console errors, every image decoded, method names and the speed-up table present), and a
real `mlflow server` serves the runs, the dashboard artifact and its UI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, foresight

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.e2e, pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found: `apt-get install chromium` "
                                 "(.ci/run installs it) to run the browser tests")]
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def chromium(url: str, profile: Path, *flags: str, budget_ms: int = 15000, timeout: float = 90) -> tuple[str, list[str]]:
    """Open `url` headless and return (the DOM after `budget_ms` of virtual time, console lines)."""
    proc = subprocess.run([CHROMIUM, *CHROME_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                           *flags, "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return proc.stdout, console


@pytest.fixture(scope="module")
def sweep(method_sweep) -> dict:
    """The session's method sweep (conftest: vanilla and EffOPD x 2 seeds, ExOPD at lam 1.25) and
    its dashboard through `foresight dashboard`."""
    out = method_sweep["out"]
    uri = f"sqlite:///{out / 'mlflow.db'}"
    t0 = time.time()
    dash = foresight("dashboard", "dash", "--uri", uri, "--out", str(out / "page"))
    return {"out": out, "uri": uri, "page": out / "page" / "dashboard.html", "run": method_sweep["run"], "dash": dash,
            "run_s": method_sweep["seconds"], "dash_s": time.time() - t0}


def test_dashboard_opens_in_chromium_with_every_image_and_the_speedup_table(sweep, tmp_path):
    assert sweep["run"].stdout.count("done:") == 5, sweep["run"].stdout[-3000:]
    printed = sweep["dash"].stdout
    assert f"dashboard: {sweep['page']}" in printed and "logged to MLflow run" in printed
    assert "ui --backend-store-uri" in printed and "viewStateShareKey=foresight" in printed
    assert sweep["dash_s"] < 60, sweep["dash_s"]

    dom, console = chromium(sweep["page"].as_uri(), tmp_path / "p1")
    assert console == [], console
    for text in ("Speed-up to target", "steps to 90%", "<b>vanilla</b>", "<b>effopd</b>", "Test accuracy",
                 "EffOPD decisions", "Time per phase", "Update geometry", "Config differences", "dash_effopd_s1"):
        assert text in dom, text
    srcs = [part.split('"', 1)[0] for part in dom.split('<img src="')[1:]]
    assert {"timing.png", "effopd_decisions.png", "geometry_scale-tiny.png", "accuracy_scale-tiny.png"} <= set(srcs), srcs
    for src in srcs:
        data = (sweep["page"].parent / src).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, src

    # every <img> decoded by the browser: a same-folder harness reads naturalWidth through the iframe
    harness = tmp_path / "harness.html"
    harness.write_text(f"""<html><body><iframe id=f src="{sweep['page'].as_uri()}"></iframe><pre id=out></pre><script>
document.getElementById('f').addEventListener('load', () => {{
  const d = document.getElementById('f').contentDocument;
  document.getElementById('out').textContent = JSON.stringify(Array.from(d.images).map(
    i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]));
}});</script></body></html>""")
    dom, console = chromium(harness.as_uri(), tmp_path / "p2", "--allow-file-access-from-files", budget_ms=5000)
    assert console == [], console
    images = json.loads(dom.split('<pre id="out">', 1)[1].split("</pre>", 1)[0])
    assert len(images) == len(srcs)
    for src, complete, width, height in images:
        assert complete and width > 300 and height > 150, (src, width, height)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


@pytest.fixture()
def mlflow_server(sweep, tmp_path):
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", sweep["uri"],
                             "--default-artifact-root", str(tmp_path / "server_artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if http(f"{base}/health") == b"OK":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log = proc.stdout.read()[-3000:] if proc.poll() is not None else ""
                raise AssertionError(f"mlflow server did not come up:\n{log}")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_mlflow_server_serves_the_runs_the_dashboard_artifact_and_the_ui(sweep, mlflow_server, tmp_path):
    base = mlflow_server
    exp = json.loads(http(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=dash"))["experiment"]
    eid = exp["experiment_id"]
    exp_tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    assert exp_tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp_tags["mlflow.sharedViewState.foresight"])
    assert view["groupBy"]["groupByKeys"][0] == {"mode": "tag", "groupByData": "method"}

    runs = json.loads(http(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [eid], "max_results": 100}))["runs"]
    tags = {r["info"]["run_name"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    parent = next(r["info"]["run_id"] for r in runs if r["info"]["run_name"] == "dash")
    children = sorted(name for name, t in tags.items() if t.get("mlflow.parentRunId") == parent)
    assert children == ["dash_effopd_s0", "dash_effopd_s1", "dash_exopd_lam125", "dash_vanilla_s0", "dash_vanilla_s1"]
    assert "dashboard/dashboard.html" in tags["dash"]["mlflow.note.content"]

    files = json.loads(http(f"{base}/api/2.0/mlflow/artifacts/list?run_id={parent}&path=dashboard"))["files"]
    names = {f["path"] for f in files}
    assert {"dashboard/dashboard.html", "dashboard/timing.png", "dashboard/effopd_decisions.png"} <= names, names
    page = http(f"{base}/get-artifact?path=dashboard/dashboard.html&run_uuid={parent}").decode()
    assert "Speed-up to target" in page and page.count('src="data:image/png;base64,') == sum(n.endswith(".png") for n in names)
    png = http(f"{base}/get-artifact?path=dashboard/timing.png&run_uuid={parent}")
    assert png.startswith(b"\x89PNG") and len(png) > 5000

    # the UI's first view: the training runs (not GenAI), trials grouped by method, charts by prefix
    dom, _ = chromium(f"{base}/#/experiments/{eid}/runs?viewStateShareKey=foresight&compareRunsMode=CHART"
                      "&workflowType=machine_learning", tmp_path / "p3", "--window-size=1400,1000", budget_ms=20000)
    for text in ("Model training", "You're viewing a shared view", "Group: vanilla", "Group: effopd", "dash_effopd_s1",
                 "dash_vanilla_s0", ">eval<", ">train<"):
        assert text in dom, (text, dom[-3000:])
    assert "No charts in this section" not in dom
    dom, _ = chromium(f"{base}/#/experiments/{eid}/runs/{parent}?workflowType=machine_learning", tmp_path / "p4")
    assert ">dashboard/dashboard.html</a>" in dom  # the parent's description links the dashboard artifact
