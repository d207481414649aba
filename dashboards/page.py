"""The static HTML page: plain HTML and CSS, no script, images beside it (`inline=False`) or
embedded as data URIs (`inline=True`, the copy logged to MLflow: its UI shows HTML artifacts in
a sandboxed blob iframe where relative image paths cannot resolve)."""

from __future__ import annotations

import base64
import time
from html import escape
from pathlib import Path

from dashboards.analysis import Analysis, GroupTable
from dashboards.figures import Panel

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1280px;
     padding:0 16px;color:#222}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px}
.meta{color:#555;font-size:13px} .meta code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
.notes{background:#fff8e1;border:1px solid #f0d98c;border-radius:4px;padding:8px 12px;margin:12px 0}
.notes ul{margin:4px 0;padding-left:20px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f5f5f5} td.l,th.l{text-align:left}
.def{color:#444;font-size:13px;max-width:980px}
figure{margin:10px 0 22px} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:12.5px}
.running{color:#1565c0} .failed,.killed,.pruned{color:#b71c1c} .finished{color:#2e7d32}
.scroll{overflow-x:auto}
"""


def _img(panel: Panel, out: Path, inline: bool) -> str:
    src = panel.file
    if inline:
        src = "data:image/png;base64," + base64.b64encode((out / panel.file).read_bytes()).decode()
    return (f'<figure><img src="{src}" alt="{escape(panel.title)}"><figcaption>{escape(panel.caption)}'
            "</figcaption></figure>")


def _speed(x: float | None, method: str) -> str:
    """The speed-up under the number (not for vanilla itself, whose speed-up is 1 by definition)."""
    if x is None or method == "vanilla":
        return ""
    return "<br><b>∞×</b>" if x == float("inf") else f"<br><b>{x:.2f}×</b>"


def speedup_html(tables: list[GroupTable]) -> str:
    parts = []
    for gt in tables:
        if not gt.rows:
            continue
        fr = list(gt.targets.values)
        head = ("<tr><th class=l>method</th><th>runs</th><th>last test accuracy</th>"
                + "".join(f"<th>steps to {f:.0%}</th>" for f in fr)
                + "".join(f"<th>wall s to {f:.0%}</th>" for f in fr) + "</tr>")
        body = []
        for r in gt.rows:
            cells = [f"<td class=l><b>{escape(r.method)}</b></td>", f"<td>{r.runs}</td>", f"<td>{r.final}</td>"]
            cells += [f"<td>{r.steps[f]}{_speed(r.step_speedup[f], r.method)}</td>" for f in fr]
            cells += [f"<td>{r.wall[f]}{_speed(r.wall_speedup[f], r.method)}</td>" for f in fr]
            body.append("<tr>" + "".join(cells) + "</tr>")
        tg = gt.targets
        targets = ", ".join(f"{f:.0%}: {v:.3f}" for f, v in tg.values.items())
        under = (f"targets {targets}." if tg.gain > 0 else "<b>vanilla did not improve on acc0, so there is no "
                 "target to reach</b> (run longer, or check the learning rate).")
        parts.append(f"<h3>{escape(gt.group.title)}</h3><div class=scroll><table class=speedup>{head}"
                     f"{''.join(body)}</table></div><p class=def>acc0 = {tg.acc0:.3f}, vanilla final = "
                     f"{tg.vanilla_final:.3f}; {under}</p>")
    if not parts:
        return "<p>No speed-up table: it needs vanilla runs with at least two evaluations (see the notes).</p>"
    return "".join(parts) + DEFINITION


DEFINITION = (
    "<p class=def><b>Target</b> at fraction f = acc0 + f × (vanilla final − acc0), where acc0 is the median "
    "step-0 test accuracy and vanilla final the median final test accuracy of the vanilla runs in the same "
    "panel. <b>Steps (wall s) to target</b>: the first evaluated step (its cumulative training seconds) whose "
    "accuracy is at least the target (first crossing, later dips do not count). Cells: median across seeds "
    "[min–max]; a median is shown when at least half the seeds reached the target; a running trial counts "
    "with its evaluations so far. <b>N×</b> under a cell: "
    "speed-up = vanilla's median / this method's median. Failed and pruned trials are left out.</p>")


def text_tables(analysis: Analysis) -> str:
    """The speed-up tables as plain text for the terminal: steps to each target (speed-up)."""
    lines = []
    for gt in analysis.tables:
        if not gt.rows:
            continue
        fr = list(gt.targets.values)
        lines.append(f"{gt.group.title}: acc0 {gt.targets.acc0:.3f}, vanilla final {gt.targets.vanilla_final:.3f}")
        lines.append(f"  {'method':<20}{'runs':>5}  {'last acc':<22}" + "".join(f"{f'steps to {f:.0%}':>24}" for f in fr))
        for r in gt.rows:
            cells = []
            for f in fr:
                sp = r.step_speedup[f]
                cells.append(f"{str(r.steps[f]) + ('' if r.method == 'vanilla' or sp is None else f' ({sp:.2f}x)'):>24}")
            lines.append(f"  {r.method:<20}{r.runs:>5}  {str(r.final):<22}" + "".join(cells))
    return "\n".join(lines)


def trials_html(analysis: Analysis) -> str:
    rows = []
    for t in analysis.sweep.trials:
        steps, acc = t.series("eval/accuracy")
        total = t.total_steps
        progress = f"{t.last_step}/{total}" if total else str(t.last_step)
        last = f"{acc[-1]:.3f} (step {steps[-1]})" if acc else "-"
        rows.append(f"<tr><td class=l>{escape(t.name)}</td><td class=l>{escape(t.method)}</td><td>{escape(t.seed)}</td>"
                    f"<td class='l {t.state}'>{t.state}</td><td>{progress}</td><td>{last}</td>"
                    f"<td class=l><code>{t.run_id[:8]}</code></td></tr>")
    return ("<div class=scroll><table><tr><th class=l>trial</th><th class=l>method</th><th>seed</th><th class=l>status"
            "</th><th>step</th><th>last test accuracy</th><th class=l>MLflow run</th></tr>" + "".join(rows)
            + "</table></div>")


def config_diff_html(analysis: Analysis) -> str:
    """Differing keys, the swept ones first (method, seed, panel keys), then the rest."""
    trials = analysis.sweep.trials
    first = ["method/type", "run/seed", *analysis.panel_keys]
    keys = sorted(analysis.diff_keys, key=lambda k: (first.index(k) if k in first else len(first), k))
    if len(trials) < 2:
        return "<p>One trial: nothing to compare.</p>"
    if not keys:
        return "<p>All trials share the same resolved config.</p>"
    head = "<tr><th class=l>trial</th>" + "".join(f"<th class=l>{escape(k)}</th>" for k in keys) + "</tr>"
    rows = ["<tr><td class=l>" + escape(t.name) + "</td>"
            + "".join(f"<td class=l>{escape(t.params.get(k, '-'))}</td>" for k in keys) + "</tr>" for t in trials]
    return (f"<div class=scroll><table>{head}{''.join(rows)}</table></div><p class=def>Only the resolved config "
            f"keys (MLflow params) that differ between trials; every other key is the same in all {len(trials)}.</p>")


def render(analysis: Analysis, sections: dict[str, list[Panel]], notes: list[str], out: Path, inline: bool,
           ui_url: str | None, command: str) -> str:
    """The whole page. `sections` maps a heading to its panels, in order."""
    sw = analysis.sweep
    states: dict[str, int] = {}
    for t in sw.trials:
        states[t.state] = states.get(t.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    kind = "Sweep" if sw.is_sweep else "Run"
    link = f' · <a href="{escape(ui_url)}">open in the MLflow UI</a>' if ui_url and ui_url.startswith("http") else ""
    swept = ", ".join(f"<code>{escape(k)}</code>" for k in analysis.panel_keys) or "none besides method and seed"
    html = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{escape(kind)} {escape(sw.name)}: "
            f"Foresight dashboard</title><style>{CSS}</style></head><body>",
            f"<h1>{kind} <code>{escape(sw.name)}</code></h1>",
            f"<p class=meta>{len(sw.trials)} trial{'s' if len(sw.trials) != 1 else ''}: {summary} · methods: "
            f"{', '.join(escape(m) for m in sorted({t.method for t in sw.trials}))} · panels per: {swept}<br>"
            f"rendered {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from <code>{escape(sw.uri)}</code> "
            f"(experiment id {escape(sw.experiment_id)}){link} · re-render: <code>{escape(command)}</code></p>"]
    if notes:
        html.append("<div class=notes><b>Notes</b><ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul></div>")
    html.append("<h2>Speed-up to target</h2>" + speedup_html(analysis.tables))
    for heading, panels in sections.items():
        if panels:
            html.append(f"<h2>{escape(heading)}</h2>" + "".join(_img(p, out, inline) for p in panels))
        if heading == "Test accuracy":
            html.append("<h2>Trials</h2>" + trials_html(analysis))
    html.append("<h2>Config differences</h2>" + config_diff_html(analysis))
    html.append("</body></html>")
    return "\n".join(html)

