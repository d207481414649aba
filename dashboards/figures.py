"""The dashboard's PNG panels (matplotlib, Agg; no pyplot state). Every function returns the
figures it wrote as `Panel`s plus notes for what it could not draw, and never raises on
partial data: a missing metric is a note, not an error."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dashboards.analysis import USABLE, Analysis, acc_vs_step, acc_vs_wall  # noqa: E402
from dashboards.metrics import Curve, aggregate  # noqa: E402
from dashboards.store import Trial  # noqa: E402

PHASES = ("rollout", "teacher", "learner", "sync", "search", "eval", "geometry")
GEOMETRY = {"geometry/stable_rank": "stable rank of ΔW (mean over matrices)",
            "geometry/spectral_fro_ratio": "spectral / Frobenius norm of ΔW",
            "geometry/top1pct_ratio": "top-1% singular value energy of ΔW",
            "geometry/sim_to_final": "Sim_K to the final update (lock-in)",
            "geometry/sim_prev": "Sim_K to the previous monitored update"}
LAYER_METRIC = re.compile(r"^geometry/layers?/(\d+)/([^/]+)/(update_norm|stable_rank)$")
"""Per-layer x module geometry, e.g. `geometry/layer/3/mlp/update_norm`, drawn as heatmaps."""
SCORE_K = re.compile(r"^effopd/score_k(\d+)$")
MAX_DECISION_RUNS = 8
DPI = 100


@dataclass
class Panel:
    file: str
    title: str
    caption: str


def method_colors(analysis: Analysis) -> dict[str, str]:
    """One color per method, the same in every panel (vanilla first)."""
    methods = sorted({t.method for t in analysis.sweep.trials}, key=lambda m: (m != "vanilla", m))
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def _save(fig: Figure, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=DPI, bbox_inches="tight")
    return name


MARKERS = "osD^vP*X"


def _band(ax, curves, color: str, label: str, order: int = 0) -> bool:
    """Mean line and min..max band; earlier methods get thicker lines and their own marker, so a
    method whose curve equals vanilla's (e.g. EffOPD accepting no candidate) still shows both."""
    band = aggregate(curves)
    if band is None:
        return False
    ax.plot(band.x, band.mean, color=color, lw=max(1.3, 3.4 - 1.0 * order), label=label, zorder=2 + order,
            marker=MARKERS[order % len(MARKERS)] if len(band.x) < 30 else None, ms=max(3.0, 6.5 - 1.5 * order))
    if np.nanmax(band.n) > 1:
        ax.fill_between(band.x, band.low, band.high, color=color, alpha=0.2, lw=0)
    return True


def accuracy_panels(analysis: Analysis, out: Path) -> tuple[list[Panel], list[str]]:
    """Per group: test accuracy vs step and vs training wall time, mean and min..max band per
    method; dotted lines for failed / pruned trials; dashed grey lines at the speed-up targets."""
    colors, panels, notes = method_colors(analysis), [], []
    for group, table in zip(analysis.groups, analysis.tables):
        fig = Figure(figsize=(12, 4), layout="constrained")
        ax_s, ax_w = fig.subplots(1, 2, sharey=True)
        drawn = False
        for order, method in enumerate(group.methods()):
            trials = [t for t in group.trials if t.method == method]
            ok = [t for t in trials if t.state in USABLE]
            label = f"{method} ({len(ok)} seed{'s' if len(ok) != 1 else ''})"
            drawn |= _band(ax_s, [acc_vs_step(t) for t in ok], colors[method], label, order)
            _band(ax_w, [acc_vs_wall(t) for t in ok], colors[method], label, order)
            for t in trials:
                if t.state not in USABLE:
                    for ax, c in ((ax_s, acc_vs_step(t)), (ax_w, acc_vs_wall(t))):
                        if len(c):
                            ax.plot(c.x, c.y, ls=":", color=colors[method], lw=1.2, label=f"{t.name} ({t.state})"
                                    if ax is ax_s else None)
        tg = table.targets
        if tg and tg.gain > 0:
            for f, v in tg.values.items():
                for ax in (ax_s, ax_w):
                    ax.axhline(v, color="0.6", ls="--", lw=0.8)
                ax_w.annotate(f"{f:.0%} target", (1.0, v), xycoords=("axes fraction", "data"), fontsize=7,
                              color="0.4", ha="right", va="bottom")
        ax_s.set(xlabel="training step", ylabel="test accuracy (eval/accuracy)", title="accuracy vs step")
        ax_w.set(xlabel="training wall time (s, cumulative timing/step)", title="accuracy vs wall time")
        for ax in (ax_s, ax_w):
            ax.grid(alpha=0.3)
        if not drawn:
            notes.append(f"{group.title}: no eval/accuracy logged yet, accuracy panel empty")
            for ax in (ax_s, ax_w):
                ax.text(0.5, 0.5, "no evaluations yet", ha="center", va="center", transform=ax.transAxes, color="0.5")
        else:
            ax_s.legend(fontsize=8, loc="lower right")
        fig.suptitle(group.title, fontsize=11)
        name = _save(fig, out, f"accuracy_{group.slug}.png")
        caption = "Line: mean across seeds; band: min to max across seeds; dotted: failed or pruned trials."
        if tg and tg.gain > 0:
            caption += " Dashed grey lines: the 50/75/90% targets of the speed-up table."
        panels.append(Panel(name, f"Test accuracy: {group.title}", caption))
    return panels, notes


def method_trials(analysis: Analysis, metric: str) -> list[tuple[str, list[Trial]]]:
    """(bar label, usable trials that logged `metric`) per (group, method) with any."""
    out = []
    for group in analysis.groups:
        for method in group.methods():
            trials = [t for t in group.trials if t.method == method and t.state in USABLE and metric in t.history]
            if trials:
                label = f"{method} ({len(trials)} run{'s' if len(trials) != 1 else ''})"
                out.append((f"{group.title}\n{label}" if len(analysis.groups) > 1 else label, trials))
    return out


def timing_panel(analysis: Analysis, out: Path) -> tuple[list[Panel], list[str]]:
    """Mean seconds per training step in each phase, stacked, one bar per (group, method): a
    phase's total seconds over all usable seeds / their number of steps (a phase that runs only at
    some steps, like search or eval, is spread over all of them); 'other' = timing/step minus the
    phases."""
    rows: list[tuple[str, dict[str, float]]] = []
    for label, trials in method_trials(analysis, "timing/step"):
        steps = sum(len(t.series("timing/step")[1]) for t in trials)
        per = {p: sum(v for t in trials for v in t.series(f"timing/{p}")[1]) / steps for p in PHASES}
        step = sum(v for t in trials for v in t.series("timing/step")[1]) / steps
        per["other"] = max(0.0, step - sum(per.values()))
        rows.append((label, per))
    if not rows:
        return [], ["time per phase: no timing/* metrics logged yet"]
    fig = Figure(figsize=(12, 1.2 + 0.55 * len(rows)), layout="constrained")
    ax = fig.subplots()
    colors = dict(zip((*PHASES, "other"),
                      ["#4c72b0", "#dd8452", "#55a868", "#8172b3", "#c44e52", "#937860", "#da8bc3", "#cccccc"]))
    left = np.zeros(len(rows))
    for phase in (*PHASES, "other"):
        widths = np.array([r[1][phase] for r in rows])
        ax.barh(range(len(rows)), widths, left=left, color=colors[phase], label=phase)
        left += widths
    for i, total in enumerate(left):
        ax.text(total, i, f" {total:.2f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="mean seconds per training step", xlim=(0, max(left) * 1.15 or 1))
    ax.legend(ncols=8, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    name = _save(fig, out, "timing.png")
    return [Panel(name, "Time per phase", "Seconds per training step in each phase (timing/<phase>), averaged "
                  "over all steps and seeds; search (EffOPD's search steps only) and eval are spread over every "
                  "step.")], []


ROLES = ("rollout", "teacher", "learner")


def utilization_panel(analysis: Analysis, out: Path) -> tuple[list[Panel], list[str]]:
    """Per (group, method): each role's utilization (`util/<role>`: its actors' busy seconds /
    (actors x step wall time), mean over steps and seeds) and the critical path's share of the
    step (`timing/critical_path` / `timing/step`): what overlapping the phases could win."""
    rows: list[tuple[str, dict[str, float]]] = []
    for label, trials in method_trials(analysis, "util/learner"):
        vals = {r: [v for t in trials for v in t.series(f"util/{r}")[1]] for r in ROLES}
        per = {r: sum(v) / len(v) for r, v in vals.items() if v}
        crit = [c / max(w, 1e-9) for t in trials
                for c, w in zip(t.series("timing/critical_path")[1], t.series("timing/step")[1])]
        if crit:
            per["critical path / step"] = sum(crit) / len(crit)
        rows.append((label, per))
    if not rows:
        return [], ["utilization: no util/* metrics logged yet"]
    keys = [*ROLES, "critical path / step"]
    fig = Figure(figsize=(12, 1.2 + 0.7 * len(rows)), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(keys)
    for j, key in enumerate(keys):
        ys = np.arange(len(rows)) + j * height
        widths = [r[1].get(key, 0.0) for r in rows]
        ax.barh(ys, widths, height=height, label=key)
        for y, w in zip(ys, widths):
            ax.text(w, y, f" {w:.0%}", va="center", fontsize=7)
    ax.set_yticks(np.arange(len(rows)) + 0.4 - height / 2, [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="share of the step's wall time", xlim=(0, 1.15))
    ax.legend(ncols=4, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    name = _save(fig, out, "utilization.png")
    return [Panel(name, "Utilization per role", "Busy share of each role's actors (util/<role>, mean over steps "
                  "and seeds) and the critical path's share of the step (timing/critical_path / timing/step; "
                  "with pipeline.max_staleness >= 1 the rollout + teacher half overlaps the learner).")], []


def decisions_panel(analysis: Analysis, out: Path) -> tuple[list[Panel], list[str]]:
    """Per EffOPD run: the validation score of W_t (effopd/base_score) and of each candidate
    W_t + c_k (W_t - anchor) (effopd/score_k<k>) at every search step; the accepted one
    (effopd/accepted_k, 0 = W_t) is boxed."""
    runs = [t for t in analysis.sweep.trials if "effopd/accepted_k" in t.history]
    notes = []
    if not runs:
        if any(t.method == "effopd" for t in analysis.sweep.trials):
            notes.append("EffOPD decisions: no effopd/* metrics logged yet (none before the first search step)")
        return [], notes
    if len(runs) > MAX_DECISION_RUNS:
        notes.append(f"EffOPD decisions: showing {MAX_DECISION_RUNS} of {len(runs)} runs")
        runs = runs[:MAX_DECISION_RUNS]
    k_max = max((int(m.group(1)) for t in runs for key in t.history if (m := SCORE_K.match(key))), default=0)
    cols = ["effopd/base_score"] + [f"effopd/score_k{k}" for k in range(1, k_max + 1)]
    ncols = min(4, len(runs))
    nrows = math.ceil(len(runs) / ncols)
    height = max(len(runs_steps(t)) for t in runs)
    fig = Figure(figsize=(max(3.2, 0.5 * len(cols) + 0.6) * ncols, 1.0 + nrows * (0.8 + 0.28 * height)),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, t in zip(axes, runs):
        steps = runs_steps(t)
        grid = np.full((len(steps), len(cols)), np.nan)
        for j, key in enumerate(cols):
            vals = dict(zip(*t.series(key)))
            for i, s in enumerate(steps):
                grid[i, j] = vals.get(s, np.nan)
        if np.isnan(grid).all():
            ax.text(0.5, 0.5, "no scores logged", ha="center", va="center", transform=ax.transAxes, color="0.5")
        else:
            ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
            mid = np.nanmean(grid)
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color="white" if v < mid else "black")
        accepted = dict(zip(*t.series("effopd/accepted_k")))
        for i, s in enumerate(steps):
            k = accepted.get(s)
            if k is not None and not math.isnan(k):
                ax.add_patch(matplotlib.patches.Rectangle((int(k) - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_xticks(range(len(cols)), ["W_t"] + [f"k={k}" for k in range(1, k_max + 1)], fontsize=7)
        ax.set_yticks(range(len(steps)), [f"t={s}" for s in steps], fontsize=7)
        ax.set_title(t.name + ("" if t.state == "finished" else f" ({t.state})"), fontsize=8)
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    name = _save(fig, out, "effopd_decisions.png")
    return [Panel(name, "EffOPD decisions", "Validation score of W_t and of each candidate W_t + c_k (W_t - anchor) "
                  "(c_k = 2k unless method.ladder is set) at every search step t (rows); the accepted candidate is "
                  "boxed in red (W_t boxed: none accepted).")], notes


DIRECTION_GROUPS = ("all", "attention", "mlp", "embedding", "other")


def directions_panel(analysis: Analysis, out: Path) -> tuple[list[Panel], list[str]]:
    """Per extrapolating run: at every search n, cos(Delta_{n-1}, Delta_n) per parameter group
    (direction/cos/<group>) and the norm ratio ||Delta_n|| / ||Delta_{n-1}|| (all parameters, right
    axis): does the direction EffOPD extrapolates along hold from one search to the next?"""
    runs = [t for t in analysis.sweep.trials if "direction/cos/all" in t.history]
    if not runs:
        return [], []
    notes = []
    if len(runs) > MAX_DECISION_RUNS:
        notes.append(f"EffOPD directions: showing {MAX_DECISION_RUNS} of {len(runs)} runs")
        runs = runs[:MAX_DECISION_RUNS]
    ncols = min(4, len(runs))
    nrows = math.ceil(len(runs) / ncols)
    fig = Figure(figsize=(3.6 * ncols, 2.8 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, t in zip(axes, runs):
        for group in DIRECTION_GROUPS:
            key = f"direction/cos/{group}"
            if key in t.history:
                steps, values = t.series(key)
                ax.plot(steps, values, marker="o", ms=3, lw=2.2 if group == "all" else 1.0, label=group,
                        color="black" if group == "all" else None)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-1.05, 1.05)
        ax.axhline(0, color="0.7", lw=0.6)
        ax.set_xlabel("search step t", fontsize=8)
        ax.set_ylabel("cos(Δ_{n-1}, Δ_n)", fontsize=8)
        ratio = t.series("direction/norm_ratio/all")
        if ratio[0]:
            twin = ax.twinx()
            twin.plot(*ratio, ls="--", color="tab:red", lw=1.0)
            twin.set_ylabel("‖Δ_n‖ / ‖Δ_{n-1}‖ (dashed)", fontsize=7, color="tab:red")
            twin.tick_params(labelsize=7, colors="tab:red")
        ax.set_title(t.name, fontsize=8)
        ax.tick_params(labelsize=7)
    if runs:
        axes[0].legend(fontsize=6, loc="lower left")
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    name = _save(fig, out, "effopd_directions.png")
    return [Panel(name, "EffOPD directions", "At every search n: the cosine between the direction it extrapolates "
                  "along, Δ_n = W_t - anchor, and the previous search's Δ_{n-1}, per parameter group (black: all), "
                  "and the norm ratio ‖Δ_n‖ / ‖Δ_{n-1}‖ (dashed, right axis). A cosine near 1 is the direction "
                  "locking in; near 0, each search sees a new direction and a jump along it overshoots.")], notes


def routes_panel(analysis: Analysis, out: Path) -> tuple[list[Panel], list[str]]:
    """Multi-teacher runs (`teacher.route`): per run, each teacher's mean sequence reward and sampled
    reverse KL on its shards (route/<teacher>/*), and each data group's test accuracy
    (eval/group/<group>/accuracy)."""
    runs = [t for t in analysis.sweep.trials if any(k.startswith("route/") for k in t.history)]
    if not runs:
        return [], []
    notes = []
    if len(runs) > MAX_DECISION_RUNS:
        notes.append(f"Teachers: showing {MAX_DECISION_RUNS} of {len(runs)} runs")
        runs = runs[:MAX_DECISION_RUNS]
    fig = Figure(figsize=(10.8, 2.8 * len(runs)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(runs), 3, squeeze=False))
    for row, t in zip(axes, runs):
        for ax, (what, key) in zip(row, (("reward", "route/{}/reward"), ("reverse KL", "route/{}/reverse_kl"),
                                         ("test accuracy", "eval/group/{}/accuracy"))):
            prefix, suffix = key.split("{}")
            for k in sorted(k for k in t.history if k.startswith(prefix) and k.endswith(suffix)):
                ax.plot(*t.series(k), lw=1.2, marker="o" if what == "test accuracy" else None, ms=3,
                        label=k[len(prefix):len(k) - len(suffix)])
            ax.set_title(f"{t.name}: {what}", fontsize=8)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
    name = _save(fig, out, "teacher_routes.png")
    return [Panel(name, "Teachers", "Each teacher's shards (teacher.route): the student's mean sequence reward and the "
                  "sampled reverse KL (sampling log-prob minus the teacher's, per token) on them, and each data group's "
                  "greedy test accuracy.")], notes


def runs_steps(t: Trial) -> list[int]:
    return sorted(set(t.series("effopd/accepted_k")[0]) | set(t.series("effopd/base_score")[0]))


def geometry_panels(analysis: Analysis, out: Path) -> tuple[list[Panel], list[str]]:
    """Per group: the live monitor's scalars per method (mean and band across seeds) and the
    update norm per module; per-layer x module heatmaps when per-layer metrics exist."""
    trials = analysis.sweep.trials
    if not any(k.startswith("geometry/") for t in trials for k in t.history):
        return [], ["geometry: not logged (set geometry.every to log the live monitor)"]
    colors, panels, notes = method_colors(analysis), [], []
    for group in analysis.groups:
        present = [k for k in GEOMETRY if any(k in t.history for t in group.trials)]
        modules = sorted({k.split("/", 2)[2] for t in group.trials for k in t.history
                          if k.startswith("geometry/update_norm/")})
        keys = present + [f"geometry/update_norm/{m}" for m in modules]
        if not keys:
            continue
        ncols = min(3, len(keys))
        nrows = math.ceil(len(keys) / ncols)
        fig = Figure(figsize=(4 * ncols, 3 * nrows), layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, key in zip(axes, keys):
            for order, method in enumerate(group.methods()):
                ok = [t for t in group.trials if t.method == method and t.state in USABLE and key in t.history]
                _band(ax, [Curve(*t.series(key)) for t in ok], colors[method], method, order)
            title = GEOMETRY.get(key) or f"update norm ‖ΔW‖_F: {key.rsplit('/', 1)[-1]}"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
        if axes[0].get_legend_handles_labels()[0]:
            axes[0].legend(fontsize=7)
        for ax in axes[len(keys):]:
            ax.set_visible(False)
        fig.suptitle(f"Update geometry: {group.title}", fontsize=11)
        name = _save(fig, out, f"geometry_{group.slug}.png")
        panels.append(Panel(name, f"Update geometry: {group.title}",
                            "ΔW = W_t - W_0 at every monitored step (orchestrator/monitor.py); line: mean across "
                            "seeds, band: min to max. Sim_K to final is logged when a run ends."))
    layer_panels, layer_notes = layer_heatmaps(analysis, out)
    return panels + layer_panels, notes + layer_notes


def layer_heatmaps(analysis: Analysis, out: Path) -> tuple[list[Panel], list[str]]:
    """Layer x module heatmaps of the last logged per-layer value, per (method, metric), from
    metrics named geometry/layer/<i>/<module>/{update_norm,stable_rank} (mean across seeds)."""
    cells: dict[tuple[str, str], dict[tuple[int, str], list[float]]] = {}
    for t in analysis.sweep.trials:
        if t.state not in USABLE:
            continue
        for key in t.history:
            m = LAYER_METRIC.match(key)
            if m:
                _, vals = t.series(key)
                if vals:
                    cells.setdefault((t.method, m.group(3)), {}).setdefault((int(m.group(1)), m.group(2)), []).append(vals[-1])
    if not cells:
        return [], ["per-layer heatmaps: no per-layer metrics (geometry/layer/<i>/<module>/update_norm or "
                    "stable_rank) logged; skipped"]
    items = sorted(cells.items())
    fig = Figure(figsize=(4 * min(3, len(items)), 3.5 * math.ceil(len(items) / 3)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(math.ceil(len(items) / 3), min(3, len(items)), squeeze=False)).ravel()
    for ax, ((method, metric), data) in zip(axes, items):
        layers = sorted({layer for layer, _ in data})
        mods = sorted({mod for _, mod in data})
        grid = np.array([[np.mean(data.get((layer, mod), [np.nan])) for mod in mods] for layer in layers])
        im = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
        if grid.size <= 96:
            mid = np.nanmean(grid)
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="white" if v < mid else "black")
        ax.set_xticks(range(len(mods)), mods, fontsize=7, rotation=45, ha="right")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
        ax.set(ylabel="layer", title=f"{method}: {metric.replace('_', ' ')}")
        fig.colorbar(im, ax=ax, shrink=0.8)
    for ax in axes[len(items):]:
        ax.set_visible(False)
    name = _save(fig, out, "geometry_layers.png")
    return [Panel(name, "Per-layer geometry", "Last logged value per layer and module, mean across seeds.")], []
