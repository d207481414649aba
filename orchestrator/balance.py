"""Choose a trial's GPU layout: how many rollout engines, teacher replicas, learner ranks and
evaluators, and whether rollout and teacher engines share their GPUs, so that no role waits on the
others for most of a step.

The search: every layout of the counts the YAML leaves unset (a pinned count stays as pinned) with
each role's memory satisfied and the trial placed on the cluster's nodes, costed by
`core/cost_model.py` with the plan's throughput constants (defaults or a calibration), ranked by
the objective:
- `gpu_time` (default): reserved GPUs x wall time per step (what a trial costs; a sweep packs the
  trials that leave GPUs free), ties to the faster;
- `time`: wall time per step, ties to fewer GPUs.
Colocation (`plan.colocate`): a rollout engine and a teacher replica on the same GPU(s), each
with half of it in Ray's accounting and its own share of memory; they take turns (rollout, then
scoring), which the strict loop and staleness 1 do anyway, so the GPUs work through both phases
instead of idling through the other's. Only with TP 1 on both (Ray gives fractional GPUs only
below one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

from core.cost_model import (Device, Model, StepCost, Throughput, Workload, decode_seconds, learner_padding,
                             learner_seconds, prefill_seconds, sync_seconds)

COUNTS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64)
"""Actor counts the search tries per role (beyond 64 a trial is pinned by hand)."""


@dataclass(frozen=True)
class Layout:
    """Actors and tensor-parallel size per role; `colocated`: teacher replica i on rollout engine i's GPUs;
    `pooled`: the teacher replicas are the trial's share of a sweep's shared pool
    (`orchestrator/teacher_pool.py`), whose GPUs the trial does not hold."""

    rollout: int
    teacher: int
    learner: int
    evaluators: int = 0
    rollout_tp: int = 1
    teacher_tp: int = 1
    evaluator_tp: int = 1
    colocated: bool = False
    pooled: bool = False

    @property
    def own_teacher(self) -> bool:
        """Whether the trial's bundles hold teacher engines of their own."""
        return not (self.colocated or self.pooled)

    @property
    def gpus(self) -> int:
        return (self.rollout * self.rollout_tp + (self.teacher * self.teacher_tp if self.own_teacher else 0)
                + self.learner + self.evaluators * self.evaluator_tp)

    def bundles(self) -> list[int]:
        """GPUs per placement-group bundle (a colocated or pooled teacher adds none)."""
        return ([self.rollout_tp] * self.rollout + ([self.teacher_tp] * self.teacher if self.own_teacher else [])
                + [1] * self.learner + [self.evaluator_tp] * self.evaluators)

    def role_gpus(self) -> dict[str, int]:
        """Devices per role the trial holds or shares with its own roles (a pooled teacher: none)."""
        return {"rollout": self.rollout * self.rollout_tp, "teacher": 0 if self.pooled else self.teacher * self.teacher_tp,
                "learner": self.learner, "evaluator": self.evaluators * self.evaluator_tp}

    def describe(self) -> str:
        tp = lambda n, t: f"{n}" + (f" x TP{t}" if t > 1 else "")  # noqa: E731
        teacher = tp(self.teacher, self.teacher_tp) + (" (colocated)" if self.colocated else "") + (" (shared pool)" if self.pooled else "")
        ev = f", evaluators {tp(self.evaluators, self.evaluator_tp)}" if self.evaluators else ""
        return f"rollout {tp(self.rollout, self.rollout_tp)}, teacher {teacher}, learner {self.learner}{ev}"


@dataclass
class Costing:
    """Everything a layout's cost depends on besides the layout (from the config and the plan)."""

    student: Model
    teacher: Model
    device: Device
    thr: Throughput
    work: Workload
    eval_work: Workload
    eval_every: int
    sets_work: Workload | None = None
    val_work: Workload | None = None
    candidates: int = 0
    searches_per_step: float = 0.0
    max_tokens: int = 22_000
    checkpointing: bool = True
    rollout_backend: str = "vllm"
    teacher_backend: str = "vllm"
    staleness: int = 0
    overlap: float = 0.0
    cores: float = math.inf
    """CPU plans: the machine's cores; a phase with more single-thread actors than cores slows down."""
    kv_tokens: Callable[[Layout], float] = field(default=lambda layout: math.inf)
    """KV-cache tokens of one rollout engine under this layout (its memory share)."""

    def cost(self, layout: Layout) -> StepCost:
        """Seconds per step by phase for `layout` (`core/cost_model.py`)."""
        d, thr, w = self.device, self.thr, self.work
        crowd = lambda n: max(1.0, n / self.cores)  # noqa: E731 - CPU: n one-thread actors on fewer cores
        kv = self.kv_tokens(layout)
        decode = lambda work, n, tp: decode_seconds(self.student, d, thr, n, tp, work, self.rollout_backend, kv) * crowd(n)  # noqa: E731
        cost = StepCost(padding=learner_padding(w, layout.learner, self.max_tokens), overlap=self.overlap,
                        staleness=self.staleness, gpus=layout.role_gpus(), colocated=layout.colocated,
                        search_on_rollout=layout.evaluators == 0)
        s = cost.seconds
        s["rollout"] = decode(w, layout.rollout, layout.rollout_tp)
        calls = math.ceil(layout.rollout / layout.teacher)
        s["teacher"] = prefill_seconds(self.teacher, d, thr, layout.teacher, layout.teacher_tp, w.tokens, calls) * crowd(layout.teacher)
        s["learner"] = learner_seconds(self.student, d, thr, layout.learner, w.tokens, cost.padding,
                                       self.checkpointing) * crowd(layout.learner)
        s["sync"] = sync_seconds(self.student, thr)
        s["eval"] = decode(self.eval_work, layout.rollout, layout.rollout_tp) / max(self.eval_every, 1)
        if self.sets_work is not None:
            s["eval_sets"] = decode(self.sets_work, layout.rollout, layout.rollout_tp) / max(self.eval_every, 1)
        if self.candidates and self.val_work is not None:
            engines, tp = (layout.evaluators, layout.evaluator_tp) if layout.evaluators else (layout.rollout, layout.rollout_tp)
            rounds = math.ceil((self.candidates + 1) / max(engines, 1))
            s["search"] = decode(self.val_work, 1, tp) * rounds * self.searches_per_step
        s["driver"] = thr.latency_step
        gen = w.generated
        cost.flops = (2 * self.student.params * gen + 2 * self.teacher.params * w.tokens
                      + 8 * self.student.params * w.tokens)
        return cost


def score(cost: StepCost, objective: str) -> tuple[float, float]:
    """Sort key: (GPU-seconds, seconds) per step for `gpu_time`, (seconds, GPU-seconds) for `time`."""
    gpu_s = cost.reserved_devices * cost.step_seconds
    return (gpu_s, cost.step_seconds) if objective == "gpu_time" else (cost.step_seconds, gpu_s)


def candidates(pinned: dict[str, int | None], tps: dict[str, int], max_gpus: int, *, evaluators: bool,
               max_evaluators: int, colocate: str) -> Iterable[Layout]:
    """Every layout within `max_gpus` that keeps the pinned counts (None: free)."""
    def counts(role: str, most: int) -> Iterable[int]:
        fixed = pinned.get(role)
        return (fixed,) if fixed else (n for n in COUNTS if n <= most)

    rtp, ttp, etp = tps["rollout"], tps["teacher"], tps["evaluator"]
    colocations = {"auto": (False, True), "rollout_teacher": (True,), "none": (False,)}[colocate]
    for colocated in colocations:
        if colocated and (rtp != 1 or ttp != 1):
            continue
        for r in counts("rollout", max_gpus // rtp):
            teachers = (r,) if colocated else counts("teacher", (max_gpus - r * rtp) // ttp)
            for t in teachers:
                if colocated and pinned.get("teacher") not in (None, r):
                    continue
                used = r * rtp + (0 if colocated else t * ttp)
                for n in counts("learner", max_gpus - used):
                    spare = max_gpus - used - n
                    for e in (counts("evaluator", min(spare // etp, max_evaluators)) if evaluators else (0,)):
                        layout = Layout(r, t, n, e, rtp, ttp, etp, colocated)
                        if layout.gpus <= max_gpus:
                            yield layout


def balance(costing: Costing, layouts: Iterable[Layout], fits: Callable[[Layout], bool],
            places: Callable[[Layout], bool], objective: str) -> tuple[Layout, StepCost] | None:
    """The best layout by `objective` that fits in memory and places on the cluster, with its cost."""
    ranked = sorted(((costing.cost(lay), lay) for lay in layouts if fits(lay)),
                    key=lambda c: (score(c[0], objective), c[1].gpus))
    for cost, layout in ranked:
        if places(layout):
            return layout, cost
    return None
