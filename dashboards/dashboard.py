"""`foresight dashboard SWEEP`: one static page comparing a sweep's trials, logged back to MLflow.

    foresight dashboard demo [--out runs/demo_dashboard] [--uri sqlite:///runs/mlflow.db | http://127.0.0.1:5000]
                             [--experiment NAME] [--no-log]

Reads the runs through MLflow's API only (dashboards/store.py), writes `<out>/dashboard.html`
with its PNG panels beside it, and logs the page (images embedded) and the PNGs as artifacts
`dashboard/` of the sweep's parent run. It also makes `mlflow ui` open the sweep usefully
(dashboards/mlflow_ui.py). Re-running it while the sweep runs redraws the progress so far.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dashboards import figures, mlflow_ui, page
from dashboards.analysis import Analysis, analyze
from dashboards.store import ACC, Sweep, client_for, load_sweep

log = logging.getLogger(__name__)
ARTIFACT_DIR = "dashboard"
PANEL_FILES = ("accuracy_*.png", "geometry_*.png", "timing.png", "utilization.png", "effopd_decisions.png",
               "effopd_directions.png", "teacher_routes.png")


@dataclass
class Result:
    page: Path
    images: list[Path]
    analysis: Analysis
    logged_to: str | None
    """The MLflow run holding the `dashboard/` artifacts (None when not logged)."""
    ui_url: str
    notes: list[str]
    """Everything the page's notes box says (partial data, panels not drawn)."""


def draw(analysis: Analysis, out: Path) -> tuple[dict[str, list[figures.Panel]], list[str]]:
    """Every panel, by page section, and the notes for what could not be drawn."""
    sections: dict[str, list[figures.Panel]] = {}
    notes: list[str] = []
    for heading, fn in (("Test accuracy", lambda: figures.accuracy_panels(analysis, out)),
                        ("EffOPD decisions", lambda: _both(figures.decisions_panel(analysis, out),
                                                           figures.directions_panel(analysis, out))),
                        ("Time per phase", lambda: _both(figures.timing_panel(analysis, out),
                                                         figures.utilization_panel(analysis, out))),
                        ("Update geometry", lambda: figures.geometry_panels(analysis, out)),
                        ("Teachers", lambda: figures.routes_panel(analysis, out))):
        panels, more = fn()
        sections[heading] = panels
        notes += more
    return sections, notes


def _both(a: tuple[list, list], b: tuple[list, list]) -> tuple[list, list]:
    return a[0] + b[0], a[1] + b[1]


def build(uri: str, sweep: str, out: Path, experiment: str | None = None, log_artifacts: bool = True,
          metric: str = ACC) -> Result:
    """Load, analyze, draw, write the page; log it to the parent run and set the UI tags. `metric`:
    the target accuracy of the curves and the speed-up table."""
    data: Sweep = load_sweep(uri, sweep, experiment, metric)
    analysis = analyze(data)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in PANEL_FILES:
        for old in out.glob(pattern):
            old.unlink()  # panels of an earlier render that this one may not draw (e.g. a group gone)
    sections, draw_notes = draw(analysis, out)
    notes = analysis.notes + draw_notes
    ui_url = mlflow_ui.ui_base(uri) + "/" + mlflow_ui.runs_path(data.experiment_id)
    command = (f"foresight dashboard {sweep} --uri {uri} --out {out}"
               + (f" --experiment {experiment}" if experiment else "") + (f" --metric {metric}" if metric != ACC else ""))
    if metric != ACC:
        notes = [f"target metric: {metric} (curves and speed-up table)"] + notes
    kwargs = dict(notes=notes, out=out, ui_url=ui_url, command=command)
    html_path = out / "dashboard.html"
    html_path.write_text(page.render(analysis, sections, inline=False, **kwargs), encoding="utf-8")
    images = sorted(out / p.file for panels in sections.values() for p in panels)
    logged_to = None
    if log_artifacts and data.parent is not None:
        logged_to = data.parent.info.run_id
        client = client_for(uri)
        with tempfile.TemporaryDirectory() as tmp:
            inline = Path(tmp) / "dashboard.html"
            inline.write_text(page.render(analysis, sections, inline=True, **kwargs), encoding="utf-8")
            client.log_artifact(logged_to, str(inline), ARTIFACT_DIR)
        for img in images:
            client.log_artifact(logged_to, str(img), ARTIFACT_DIR)
        mlflow_ui.configure(client, data.experiment_id, logged_to, sweep, analysis.panel_keys, metric_keys(data),
                            page_summary(analysis), data.is_sweep)
    elif log_artifacts:  # a flat experiment: no run to hold the page, but the UI view still helps
        client = client_for(uri)
        mlflow_ui.configure(client, data.experiment_id, None, sweep, analysis.panel_keys, metric_keys(data), "", True)
    return Result(html_path, images, analysis, logged_to, ui_url, notes)


def metric_keys(data: Sweep) -> set[str]:
    return {k for t in data.trials for k in t.metric_keys}


def page_summary(analysis: Analysis) -> str:
    trials = analysis.sweep.trials
    methods = sorted({t.method for t in trials})
    text = f"{len(trials)} trial{'s' if len(trials) != 1 else ''} ({', '.join(methods)})"
    best = [(r.step_speedup.get(0.9), r.method, t.group.title) for t in analysis.tables for r in t.rows
            if r.method != "vanilla" and r.step_speedup.get(0.9)]
    if best:
        sp, method, title = max(best)
        text += f"; best steps-to-90% speed-up: {method} {sp:.2f}x vs vanilla ({title})"
    return text
