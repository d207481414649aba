"""Make `mlflow ui` (3.17) open a sweep on something useful, through tags only.

What the 3.17 UI does (read from mlflow/server/js/build):
- The experiment page shows the GenAI view ("Traces") or the training-runs view by a
  *workflow type*, kept in the browser's local storage (default: GenAI) and overridden by the
  URL parameter `workflowType=machine_learning`. Older 3.x UIs chose the view from the
  experiment tag `mlflow.experimentKind` instead; it is set too (`custom_model_development`).
- Child runs are collapsed under their parent, and the charts only draw expanded runs. Expansion
  (`runsExpanded`) is per browser and cannot be shared, but a *shared view* can: the UI reads the
  experiment tag `mlflow.sharedViewState.<key>` (JSON of the runs-page state) when the URL has
  `viewStateShareKey=<key>`. The view written here groups the trials by method and the swept
  keys (`groupBy`: the charts then draw one mean line with a min..max band per group, every
  trial included), shows every run in the charts (`runsHiddenMode: SHOW_ALL`), sorts by
  start time and orders the chart sections eval, train, timing, effopd, geometry (with
  `isAccordionReordered` and an empty chart list, the UI generates one chart per metric into the
  section named by its prefix and keeps the given section order).
- A run's description is its tag `mlflow.note.content` (markdown) on the run page.

The first view: `<ui>/#/experiments/<id>/runs?viewStateShareKey=foresight&compareRunsMode=CHART&workflowType=machine_learning`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

VIEW_KEY = "foresight"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
SHARED_VIEW_TAG = "mlflow.sharedViewState."
DESCRIPTION_TAG = "mlflow.note.content"
SECTIONS = ("eval", "train", "timing", "effopd", "geometry", "geometry/update_norm")
"""Chart sections (metric-name prefixes) in the order a reader wants them; others follow."""


def runs_path(experiment_id: str) -> str:
    """The UI route (after the host) of the experiment's training runs with the shared view."""
    return (f"#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&compareRunsMode=CHART"
            "&workflowType=machine_learning")


def artifact_path_in_ui(experiment_id: str, run_id: str, path: str) -> str:
    """The run page's artifact viewer on `path` (training view, not the GenAI one)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}?workflowType=machine_learning"


def ui_base(uri: str) -> str:
    """Where the UI of this store is: the server itself, or what `mlflow ui` serves by default."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def ui_command(uri: str) -> str | None:
    """The command that serves the UI for a local store (None for a server URI), with the `mlflow`
    installed beside this Python (e.g. `.venv/bin/mlflow`)."""
    if uri.startswith(("http://", "https://")):
        return None
    exe = Path(sys.executable).parent / "mlflow"
    if exe.is_file():
        try:
            exe = exe.relative_to(Path.cwd())
        except ValueError:
            pass
    return f"{exe if exe.is_file() else 'mlflow'} ui --backend-store-uri {uri} --port 5000"


def shared_view(group_params: list[str], metric_keys: set[str]) -> dict[str, Any]:
    """Runs-page state: group by the `method` tag and the swept params, all runs in the charts,
    chart sections in reading order (the UI fills each section with one chart per metric; only
    sections with metrics are listed, so none reads "No charts in this section")."""
    keys = [{"mode": "tag", "groupByData": "method"}] + [{"mode": "param", "groupByData": k} for k in group_params]
    present = {k.rsplit("/", 1)[0] for k in metric_keys if "/" in k}
    sections = [{"uuid": f"foresight-{name.replace('/', '-')}", "name": name, "display": True, "isReordered": False}
                for name in SECTIONS if name in present]
    return {"orderByKey": "attributes.start_time", "orderByAsc": False, "runsHiddenMode": "SHOW_ALL",
            "groupBy": {"aggregateFunction": "average", "groupByKeys": keys}, "useGroupedValuesInCharts": True,
            "hideEmptyCharts": True, "isAccordionReordered": True, "compareRunSections": sections,
            "compareRunCharts": []}


def description(sweep_name: str, experiment_id: str, run_id: str | None, summary: str, is_sweep: bool) -> str:
    """Markdown for the parent run's description: the dashboard link, the compare-view link."""
    lines = [f"**{'Sweep' if is_sweep else 'Run'} `{sweep_name}`**: {summary}.", ""]
    if run_id:
        link = artifact_path_in_ui(experiment_id, run_id, "dashboard/dashboard.html")
        lines.append(f"- Dashboard: [dashboard/dashboard.html]({link}) (speed-up table, accuracy with seed bands, "
                     "EffOPD decisions, time per phase, geometry, config differences)")
    if is_sweep:
        lines.append(f"- Trials side by side: [charts grouped by method]({runs_path(experiment_id)})")
    lines.append(f"- Re-render: `foresight dashboard {sweep_name}` (rendered {time.strftime('%Y-%m-%d %H:%M %Z')})")
    return "\n".join(lines)


def configure(client, experiment_id: str, run_id: str | None, sweep_name: str, group_params: list[str],
              metric_keys: set[str], summary: str, is_sweep: bool) -> None:
    """Set the experiment's kind and shared view, and the parent run's description."""
    client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    view = shared_view(group_params, metric_keys)
    client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + VIEW_KEY, json.dumps(view))
    if run_id:
        client.set_tag(run_id, DESCRIPTION_TAG, description(sweep_name, experiment_id, run_id, summary, is_sweep))
