"""From trials to what the page shows: panel groups, accuracy curves, speed-up tables, config
differences and notes on partial data.

Panel keys: the params that differ between trials, minus the method and the seed (lines and
bands within a panel), minus keys that follow from the method or from the seed alone (e.g.
`plan/evaluator/actors` exists for EffOPD only), minus per-trial bookkeeping (`run/name`) and
`run/steps` (runs of different lengths share a panel; the page notes it). Every
distinct combination of the panel keys (with `run/scale` always first) is one panel, and one
speed-up table.

Wall time of an evaluation: cumulative `timing/step` up to that step (training time, including
the step's evaluation and search, excluding restarts and queueing); runs without `timing/step`
fall back to metric timestamps since the step-0 evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dashboards.metrics import BASELINE, Curve, SpeedupRow, Targets, cumulative, speedup_rows, targets, wall_at
from dashboards.store import Sweep, Trial

BOOKKEEPING = ("run/name", "run/output_dir", "run/steps", "tracking/uri", "tracking/experiment")
"""Never panel keys (they still appear in the config differences)."""
METHOD_KEY, SEED_KEY, SCALE_KEY = "method/type", "run/seed", "run/scale"
USABLE = ("running", "finished")
"""Trial states whose curves enter means, bands and the speed-up table."""


@dataclass
class Group:
    """One panel: trials sharing the values of the panel keys."""

    key: tuple[tuple[str, str], ...]
    trials: list[Trial]

    @property
    def title(self) -> str:
        return ", ".join(f"{_short(k)} {v}" for k, v in self.key) or "all trials"

    @property
    def slug(self) -> str:
        text = "_".join(f"{_short(k)}-{v}" for k, v in self.key) or "all"
        return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)

    def methods(self) -> list[str]:
        return sorted({t.method for t in self.trials}, key=lambda m: (m != BASELINE, m))


@dataclass
class GroupTable:
    group: Group
    targets: Targets | None
    rows: list[SpeedupRow]
    note: str = ""


@dataclass
class Analysis:
    sweep: Sweep
    panel_keys: list[str]
    groups: list[Group]
    tables: list[GroupTable]
    diff_keys: list[str]
    notes: list[str] = field(default_factory=list)


def _short(key: str) -> str:
    return {"run/scale": "scale", "learner/lr": "lr"}.get(key, key)


def values(trials: list[Trial], key: str) -> list[str]:
    return [t.params.get(key, "-") for t in trials]


def determined_by(trials: list[Trial], key: str, by: str) -> bool:
    """True if `key` has one value within every group of trials sharing a value of `by`."""
    seen: dict[str, str] = {}
    for t in trials:
        b, v = t.params.get(by, "-"), t.params.get(key, "-")
        if seen.setdefault(b, v) != v:
            return False
    return True


def differing_keys(trials: list[Trial]) -> list[str]:
    """Params whose value differs between trials (a missing param counts as the value '-')."""
    keys = sorted({k for t in trials for k in t.params})
    return [k for k in keys if len(set(values(trials, k))) > 1]


def label_method_variants(trials: list[Trial]) -> None:
    """Trials of one method type whose method settings differ (ExOPD at two lambdas) are different
    lines: label them `<type> <setting>=<value>`."""
    by_type: dict[str, list[Trial]] = {}
    for t in trials:
        by_type.setdefault(t.method, []).append(t)
    for kind, group in by_type.items():
        keys = [k for k in differing_keys(group) if k.startswith("method/") and k != METHOD_KEY]
        if len(group) > 1 and keys:
            for t in group:
                t.label = " ".join([kind] + [f"{k.split('/')[-1]}={_shown(t.params.get(k, '-'))}" for k in keys])


def panel_keys(trials: list[Trial]) -> list[str]:
    """Method settings (`method/...`) make lines, not panels (see `label_method_variants`)."""
    keys = [k for k in differing_keys(trials) if k not in (METHOD_KEY, SEED_KEY, *BOOKKEEPING)
            and not k.startswith("method/")
            and not determined_by(trials, k, METHOD_KEY) and not determined_by(trials, k, SEED_KEY)]
    return sorted(keys, key=lambda k: (k != SCALE_KEY, k))


def group_trials(trials: list[Trial], keys: list[str]) -> list[Group]:
    groups: dict[tuple, list[Trial]] = {}
    for t in trials:
        key = tuple((k, t.params.get(k, "-")) for k in keys)
        if SCALE_KEY not in keys:
            key = ((SCALE_KEY, t.scale),) + key
        groups.setdefault(key, []).append(t)
    return [Group(k, v) for k, v in sorted(groups.items(), key=lambda kv: tuple(_sortable(v) for _, v in kv[0]))]


def _sortable(value: str) -> tuple:
    """Numbers by value, sizes like 1.5B / 14B by size (after names such as `tiny`)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?(?:e-?\d+)?)([KMB]?)", value)
    if m is None:
        return (0, 0.0, value)
    return (1, float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[m.group(2)], value)


def acc_vs_step(t: Trial) -> Curve:
    steps, acc = t.series(t.metric)
    return Curve(steps, acc)


def acc_vs_wall(t: Trial) -> Curve:
    """Accuracy against training wall seconds (module docstring)."""
    steps, acc = t.series(t.metric)
    step_s, secs = t.series("timing/step")
    if step_s:
        walls = wall_at(steps, cumulative(step_s, secs))
        pts = [(w, a) for w, a in zip(walls, acc) if w is not None]
    else:
        stamps = [ts for _, _, ts in t.history.get(t.metric, [])]
        pts = [((ts - stamps[0]) / 1000.0, a) for ts, a in zip(stamps, acc)] if stamps else []
    return Curve([w for w, _ in pts], [a for _, a in pts])


def group_table(group: Group) -> GroupTable:
    usable = [t for t in group.trials if t.state in USABLE and len(acc_vs_step(t)) >= 1]
    vanilla = [acc_vs_step(t) for t in usable if t.method == BASELINE]
    finished_vanilla = [acc_vs_step(t) for t in usable if t.method == BASELINE and t.state == "finished"]
    tg = targets(finished_vanilla) or targets(vanilla)
    if tg is None:
        why = "no vanilla run" if not any(t.method == BASELINE for t in group.trials) else \
            "no vanilla run with two evaluations yet"
        return GroupTable(group, None, [], f"{group.title}: {why}, so no target and no speed-up")
    note = "" if finished_vanilla else f"{group.title}: vanilla has not finished; targets use its accuracy so far"
    if tg.gain <= 0:
        note = (f"{group.title}: vanilla did not improve (acc0 {tg.acc0:.3f}, final {tg.vanilla_final:.3f}), "
                "so the speed-up table has no targets")
    by_method: dict[str, list[tuple[Curve, Curve]]] = {}
    for t in usable:
        by_method.setdefault(t.method, []).append((acc_vs_step(t), acc_vs_wall(t)))
    return GroupTable(group, tg, speedup_rows(by_method, tg), note)


def partial_data_notes(trials: list[Trial]) -> list[str]:
    notes = []
    for t in trials:
        total = t.total_steps
        if t.state not in USABLE:
            notes.append(f"{t.name}: {t.state}"
                         + (f" at step {t.tags['pruned_at_step']}" if t.tags.get("pruned_at_step") else "")
                         + "; drawn as a dotted line, left out of means, bands and the speed-up table")
        elif t.state == "running":
            notes.append(f"{t.name}: running, step {t.last_step}" + (f" of {total}" if total else "")
                         + "; re-render to see its progress")
        if t.metric not in t.history:
            notes.append(f"{t.name} has no {t.metric} yet")
    ends = {t.total_steps for t in trials if t.total_steps}
    if len(ends) > 1:
        notes.append(f"trials run different step counts ({', '.join(map(str, sorted(ends)))}): "
                     "bands cover only the steps each seed reached")
    return notes


def analyze(sweep: Sweep) -> Analysis:
    trials = sweep.trials
    label_method_variants(trials)
    keys = panel_keys(trials)
    groups = group_trials(trials, keys)
    tables = [group_table(g) for g in groups]
    notes = list(sweep.notes) + partial_data_notes(trials)
    notes += [t.note for t in tables if t.note]
    diff = [k for k in differing_keys(trials) if k != "run/name"]
    return Analysis(sweep, keys, groups, tables, diff, notes)


def _shown(value: str) -> str:
    """A setting's value in a label (`None` and a missing key mean the default)."""
    return "default" if value in ("None", "-", "") else value
