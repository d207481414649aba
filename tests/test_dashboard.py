"""Dashboard numbers on hand-made curves (steps-to-target, seed aggregation), and the whole page
rendered from a synthetic MLflow store with the partial data a live sweep has (a running trial,
a failed one, a pruned one, missing metrics, different step counts). No Ray, a few seconds."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest

from dashboards.metrics import Curve, aggregate, first_crossing, speedup_rows, spread, targets


# ---------------------------------------------------------------- steps-to-target
def test_first_crossing_never_reached_is_none():
    assert first_crossing(Curve([0, 4, 8], [0.3, 0.4, 0.5]), 0.51) is None


def test_first_crossing_at_step_zero():
    assert first_crossing(Curve([0, 4, 8], [0.6, 0.4, 0.7]), 0.55) == 0


def test_first_crossing_of_a_noisy_curve_is_the_first_one_even_if_it_dips_later():
    noisy = Curve([0, 2, 4, 6, 8, 10], [0.30, 0.52, 0.61, 0.48, 0.66, 0.58])
    assert first_crossing(noisy, 0.6) == 4
    assert first_crossing(noisy, 0.65) == 8
    assert first_crossing(noisy, 0.5) == 2


def test_first_crossing_sorts_points_and_counts_equality():
    assert first_crossing(Curve([8, 0, 4], [0.9, 0.1, 0.5]), 0.5) == 4


def test_targets_and_speedup_table_on_hand_made_curves():
    # vanilla: 0.2 -> 0.6 in 40 steps (gain 0.4): targets 0.4 / 0.5 / 0.56
    vanilla = [Curve([0, 10, 20, 30, 40], [0.2, 0.3, 0.4, 0.5, 0.6]),
               Curve([0, 10, 20, 30, 40], [0.2, 0.35, 0.45, 0.5, 0.6])]
    fast = [Curve([0, 10, 20, 30, 40], [0.2, 0.5, 0.6, 0.6, 0.62]),
            Curve([0, 10, 20, 30, 40], [0.2, 0.45, 0.58, 0.6, 0.61])]
    tg = targets(vanilla)
    assert tg.acc0 == pytest.approx(0.2) and tg.vanilla_final == pytest.approx(0.6)
    assert tg.values == pytest.approx({0.5: 0.4, 0.75: 0.5, 0.9: 0.56})
    wall = lambda c, sec: Curve([x * sec for x in c.x], c.y)  # noqa: E731
    rows = speedup_rows({"vanilla": [(c, wall(c, 1.0)) for c in vanilla],
                         "effopd": [(c, wall(c, 2.0)) for c in fast]}, tg)
    assert [r.method for r in rows] == ["vanilla", "effopd"]
    van, eff = rows
    assert van.steps[0.5].median == 20 and van.steps[0.9].median == 40
    assert eff.steps[0.5].median == 10 and eff.steps[0.9].median == 20
    assert eff.step_speedup[0.5] == pytest.approx(2.0) and eff.step_speedup[0.9] == pytest.approx(2.0)
    assert eff.wall_speedup[0.9] == pytest.approx(1.0)  # twice as fast in steps, each step twice as slow
    assert van.step_speedup[0.75] == pytest.approx(1.0)


def test_speedup_when_a_method_never_reaches_the_target():
    vanilla = [Curve([0, 10], [0.2, 0.6])]
    flat = [Curve([0, 10], [0.2, 0.25]), Curve([0, 10], [0.2, 0.3])]
    rows = speedup_rows({"vanilla": [(c, c) for c in vanilla], "exopd": [(c, c) for c in flat]}, targets(vanilla))
    exopd = rows[1]
    assert exopd.steps[0.5].median is None and exopd.steps[0.5].missing == 2
    assert exopd.step_speedup[0.5] is None
    assert str(exopd.steps[0.5]) == "not reached"


def test_no_target_when_vanilla_does_not_improve():
    vanilla = [Curve([0, 4, 8], [0.32, 0.2, 0.27])]
    tg = targets(vanilla)
    assert tg.gain < 0
    rows = speedup_rows({"vanilla": [(c, c) for c in vanilla], "effopd": [(c, c) for c in vanilla]}, tg)
    for r in rows:  # every run 'reaches' a target below acc0 at step 0: that is no speed-up
        assert all(s.median is None for s in r.steps.values()) and all(v is None for v in r.step_speedup.values())
        assert str(r.steps[0.9]) == "-"


def test_spread_needs_half_the_seeds():
    assert spread([10, None]).median == 10
    assert spread([10, None, None]).median is None
    s = spread([4, 8, 6])
    assert (s.median, s.low, s.high, s.missing) == (6, 4, 8, 0)
    assert str(s) == "6 [4-8]"


# ---------------------------------------------------------------- seed aggregation
def test_aggregate_mean_and_band_on_a_shared_grid():
    band = aggregate([Curve([0, 4, 8], [0.2, 0.4, 0.6]), Curve([0, 4, 8], [0.2, 0.6, 0.8])])
    assert list(band.x) == [0, 4, 8]
    assert band.mean == pytest.approx([0.2, 0.5, 0.7])
    assert band.low == pytest.approx([0.2, 0.4, 0.6]) and band.high == pytest.approx([0.2, 0.6, 0.8])
    assert list(band.n) == [2, 2, 2]


def test_aggregate_interpolates_between_a_seeds_own_points_and_never_extrapolates():
    # seed b evaluated at 0 and 8 only, seed c stopped at step 4 (still running)
    band = aggregate([Curve([0, 4, 8], [0.0, 0.4, 0.8]), Curve([0, 8], [0.0, 0.4]), Curve([0, 4], [0.0, 1.0])])
    assert list(band.x) == [0, 4, 8]
    assert band.mean[1] == pytest.approx((0.4 + 0.2 + 1.0) / 3)
    assert list(band.n) == [3, 3, 2]
    assert band.mean[2] == pytest.approx(0.6) and band.high[2] == pytest.approx(0.8)


def test_aggregate_of_nothing_is_none():
    assert aggregate([]) is None and aggregate([Curve([], [])]) is None


# ---------------------------------------------------------------- a whole page from a synthetic store
def _log(client, run_id, step, metrics, ts):
    from mlflow.entities import Metric

    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def new_experiment(client, name: str, artifacts: Path) -> str:
    """An experiment whose artifacts go to a temp folder (MLflow's default is ./mlruns)."""
    return client.create_experiment(name, artifact_location=(artifacts / name).as_uri())


def synthetic_sweep(uri: str, artifacts: Path, name: str = "synth") -> dict:
    """A sweep as `foresight run` logs it: parent + children (2 methods x 2 seeds, finished), one
    running trial, one failed, one pruned; effopd decisions, timing, geometry on some."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    eid = new_experiment(client, name, artifacts)
    parent = client.create_run(eid, run_name=name, tags={"sweep": name}).info.run_id
    t0 = int(time.time() * 1000)
    ids = {}

    def trial(method, seed, steps, status, curve, lr="1e-05", geometry=False, pruned_at=None):
        tname = f"{name}_{method}_s{seed}" + ("" if lr == "1e-05" else f"_lr{lr}")
        rid = client.create_run(eid, run_name=tname, tags={"mlflow.parentRunId": parent, "method": method,
                                                           "seed": str(seed), "scale": "tiny"}).info.run_id
        params = {"method/type": method, "run/seed": str(seed), "run/scale": "tiny", "run/name": tname,
                  "run/steps": str(steps), "learner/lr": lr, "eval/every": "4"}
        if method == "effopd":
            params["plan/evaluator/actors"] = "1"
        for k, v in params.items():
            client.log_param(rid, k, v)
        ids[tname] = rid
        for step, acc in curve:
            _log(client, rid, step, {"eval/accuracy": acc}, t0 + step * 1000)
        for step in range(1, max(s for s, _ in curve) + 1):
            m = {"timing/rollout": 0.5, "timing/teacher": 0.2, "timing/learner": 0.8, "timing/sync": 0.1,
                 "timing/eval": 0.05, "timing/step": 1.7 + (0.4 if method == "effopd" else 0),
                 "timing/critical_path": 1.6, "util/rollout": 0.3, "util/teacher": 0.12, "util/learner": 0.47}
            if method == "effopd":
                m["timing/search"] = 0.4
            if geometry and step % 4 == 0:
                m.update({"geometry/stable_rank": 1 + step / 8, "geometry/spectral_fro_ratio": 0.9 - step / 80,
                          "geometry/top1pct_ratio": 0.5, "geometry/update_norm/mlp": step / 10,
                          "geometry/update_norm/attention": step / 20, "geometry/layer/0/mlp/update_norm": step,
                          "geometry/layer/1/mlp/update_norm": step / 2, "geometry/layer/0/attention/update_norm": 1})
            if method == "effopd" and step & (step - 1) == 0 and step >= 2:
                m.update({"effopd/base_score": 0.5, "effopd/accepted_k": float(step % 3),
                          **{f"effopd/score_k{k}": 0.5 + 0.01 * k * (-1) ** step for k in range(1, 6)}})
                if step >= 4:  # from the second search on: the direction against the last one's
                    m.update({"direction/cos/all": 0.9 - 1 / step, "direction/cos/mlp": 0.8,
                              "direction/norm_ratio/all": 1.5})
            _log(client, rid, step, m, t0 + step * 1000)
        if pruned_at:
            client.set_tag(rid, "pruned", "true")
            client.set_tag(rid, "pruned_at_step", str(pruned_at))
        if status != "RUNNING":
            client.set_terminated(rid, status=status)

    trial("vanilla", 0, 16, "FINISHED", [(0, 0.3), (4, 0.4), (8, 0.5), (12, 0.55), (16, 0.6)], geometry=True)
    trial("vanilla", 1, 16, "FINISHED", [(0, 0.3), (4, 0.35), (8, 0.5), (12, 0.6), (16, 0.6)], geometry=True)
    trial("effopd", 0, 16, "FINISHED", [(0, 0.3), (4, 0.55), (8, 0.6), (12, 0.6), (16, 0.62)], geometry=True)
    trial("effopd", 1, 16, "RUNNING", [(0, 0.3), (4, 0.5), (8, 0.58)], geometry=True)
    trial("effopd", 2, 16, "FAILED", [(0, 0.3), (4, 0.45)])
    trial("vanilla", 2, 12, "KILLED", [(0, 0.3), (4, 0.32)], pruned_at=4)
    trial("vanilla", 0, 16, "FINISHED", [(0, 0.3), (4, 0.5), (8, 0.6), (16, 0.65)], lr="3e-05")
    client.set_terminated(parent, status="RUNNING")
    return {"client": client, "experiment_id": eid, "parent": parent, "trials": ids}


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One sqlite store for the module (creating one costs ~3 s of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory, store_uri, artifacts):
    from dashboards.dashboard import build

    root = tmp_path_factory.mktemp("dash")
    uri = store_uri
    store = synthetic_sweep(uri, artifacts)
    result = build(uri, "synth", root / "out")
    return {"root": root, "uri": uri, "result": result, "html": result.page.read_text(), **store}


def test_page_has_every_section_and_the_speedup_table(rendered):
    html = rendered["html"]
    for heading in ("Speed-up to target", "Test accuracy", "EffOPD decisions", "Time per phase", "Update geometry",
                    "Trials", "Config differences"):
        assert f"<h2>{heading}</h2>" in html, heading
    assert "acc0 + f × (vanilla final − acc0)" in html
    table = html.split("<table class=speedup>")[1].split("</table>")[0]  # the lr 1e-05 group comes first
    assert "<b>vanilla</b>" in table and "<b>effopd</b>" in table
    # effopd's finished + running seeds reach 50% of vanilla's gain (0.45) at step 4, vanilla at 8 (median)
    assert "<b>2.00×</b>" in table


def test_page_images_exist_are_pngs_and_are_referenced(rendered):
    html, out = rendered["html"], rendered["result"].page.parent
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == len(rendered["result"].images) >= 5
    for src in srcs:
        data = (out / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, src
    assert "geometry_layers.png" in srcs and "effopd_decisions.png" in srcs and "timing.png" in srcs
    assert "utilization.png" in srcs and "Utilization per role" in html
    assert "effopd_directions.png" in srcs and "EffOPD directions" in html


def test_panels_per_swept_key_and_partial_data_notes(rendered):
    analysis = rendered["result"].analysis
    assert analysis.panel_keys == ["learner/lr"]  # not plan/evaluator/actors (follows from the method)
    assert [g.title for g in analysis.groups] == ["scale tiny, lr 1e-05", "scale tiny, lr 3e-05"]
    notes = "\n".join(analysis.notes)
    assert "synth_effopd_s2: failed; drawn as a dotted line" in notes
    assert "synth_vanilla_s2: pruned at step 4" in notes
    assert "synth_effopd_s1: running, step 8 of 16" in notes
    assert "different step counts (12, 16)" in notes
    assert "no vanilla" not in notes
    assert "plan/evaluator/actors" in rendered["html"]  # config differences show every differing key


def test_logged_to_the_parent_with_embedded_images_and_ui_tags(rendered, tmp_path):
    client, parent = rendered["client"], rendered["parent"]
    assert rendered["result"].logged_to == parent
    names = {a.path for a in client.list_artifacts(parent, "dashboard")}
    assert "dashboard/dashboard.html" in names and "dashboard/timing.png" in names
    local = client.download_artifacts(parent, "dashboard/dashboard.html", str(tmp_path))
    text = open(local, encoding="utf-8").read()
    assert text.count('<img src="data:image/png;base64,') == len(rendered["result"].images)
    run = client.get_run(parent)
    assert "dashboard/dashboard.html" in run.data.tags["mlflow.note.content"]
    exp = client.get_experiment(rendered["experiment_id"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert '"groupByData": "learner/lr"' in exp.tags["mlflow.sharedViewState.foresight"]
    assert "viewStateShareKey=foresight" in rendered["result"].ui_url


def test_a_single_run_and_an_empty_run_render_with_notes(tmp_path, store_uri, artifacts):
    from mlflow.tracking import MlflowClient

    from dashboards.dashboard import build

    uri = store_uri
    client = MlflowClient(uri)
    eid = new_experiment(client, "one", artifacts)
    rid = client.create_run(eid, run_name="one", tags={"method": "vanilla"}).info.run_id
    result = build(uri, "one", tmp_path / "empty")  # no metrics at all yet
    assert "no eval/accuracy" in " ".join(result.analysis.notes)
    assert result.logged_to == rid and not result.analysis.sweep.is_sweep
    for step, acc in ((0, 0.2), (5, 0.4)):
        _log(client, rid, step, {"eval/accuracy": acc, "timing/step": 1.0}, 1000 * step)
    result = build(uri, "one", tmp_path / "one")
    html = result.page.read_text()
    assert "<h1>Run <code>one</code></h1>" in html and "One trial: nothing to compare." in html
    assert "geometry: not logged" in html


def test_a_sweep_before_its_first_trial(tmp_path, store_uri, artifacts):
    from mlflow.tracking import MlflowClient

    from dashboards.dashboard import build

    uri = store_uri
    client = MlflowClient(uri)
    eid = new_experiment(client, "early", artifacts)
    client.create_run(eid, run_name="early", tags={"sweep": "early", "trials": "4"})
    result = build(uri, "early", tmp_path / "out")
    assert result.analysis.sweep.is_sweep and result.analysis.sweep.trials == []
    assert "no trial has started yet" in result.page.read_text()


def test_unknown_sweep_exits_2_with_the_reason(tmp_path, capsys, store_uri):
    from orchestrator.cli import main

    code = main(["dashboard", "nope", "--uri", store_uri, "--out", str(tmp_path / "o")])
    assert code == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err


def test_wall_time_is_cumulative_step_time(rendered):
    from dashboards.analysis import acc_vs_wall

    trial = next(t for t in rendered["result"].analysis.sweep.trials if t.name == "synth_effopd_s0")
    wall = acc_vs_wall(trial)
    assert wall.x[:3] == pytest.approx([0.0, 4 * 2.1, 8 * 2.1])
    assert not any(math.isnan(v) for v in wall.y) and np.all(np.diff(wall.x) > 0)
