"""The rollout -> teacher half of an OPD step, launched ahead of the learner by at most
`pipeline.max_staleness` steps.

A step's batch is made by `launch(u)`: every rollout worker samples its shard with the weights the
driver holds now, and each shard goes to a teacher as soon as it exists (the teacher call takes the
rollout's object ref, so Ray starts it when that shard is done: no barrier between the phases).

With max staleness s, before the learner trains step t the batches of steps t .. t+s are in flight,
all sampled with weights no older than W_{t-1-s'} for the step t+s' they feed, i.e. a batch trained
at step u was sampled by the policy of step >= u-1-s (staleness = (u-1) - weights step <= s).
s = 0 is the strictly on-policy loop. A *barrier* step b (an EffOPD search, an evaluation, a
checkpoint: anything that reads or replaces the weights between learner steps) is never crossed:
no batch for a step after b is launched before b is done, so a jump never mixes with samples of
the pre-jump policy, and the pipeline is empty at every checkpoint (resume is exact).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Launched:
    """One step's batch in flight: rollout parts scored by teachers, and their busy-time refs."""

    step: int
    weights_step: int
    """The learner step whose weights sampled this batch (0: W_0)."""
    parts: list[tuple[Any, Any, int]]
    """(rollout ref, teacher ref, rows) per rollout worker, in batch order (`Learner.train_step`)."""
    rollout_meta: list[Any] = field(default_factory=list)
    teacher_meta: list[Any] = field(default_factory=list)
    teachers: list[str] = field(default_factory=list)
    """The teacher that scored each part (`orchestrator/routing.py`)."""

    @property
    def staleness(self) -> int:
        return (self.step - 1) - self.weights_step


def evaluates_at(cfg: Any, step: int) -> bool:
    """Evaluation steps: every `eval.every`, the last, and with `eval.at_powers_of_two` each search step."""
    from core.extrapolation import is_search_step

    return step % cfg.eval.every == 0 or step == cfg.run.steps or (cfg.eval.at_powers_of_two and is_search_step(step))


def is_barrier(cfg: Any, method: Any, step: int) -> bool:
    """Steps after which something reads or replaces the weights outside a learner step (search,
    evaluation, the gradient projection's start, checkpoint): the pipeline does not run past them."""
    projection = cfg.learner.grad_project_rank and step == max(1, round(cfg.learner.grad_project_at * cfg.run.steps))
    return bool(method.searches_at(step) or evaluates_at(cfg, step) or projection
                or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0))


def overlap_share(cfg: Any, pipelined: bool | None = None) -> float:
    """Share of steps whose producer half overlaps the learner's step before: 0 in the strict loop,
    else the steps that follow no barrier (the first step of a run or after a barrier runs alone).
    `pipelined`: as if `pipeline.max_staleness` were >= 1 (True) or 0 (False)."""
    from core.methods import method_of

    if not (cfg.pipeline.max_staleness >= 1 if pipelined is None else pipelined):
        return 0.0
    method, steps = method_of(cfg.method), min(cfg.run.steps, 100_000)
    alone = 1 + sum(is_barrier(cfg, method, s) for s in range(1, steps))
    return max(0.0, 1.0 - alone / steps)


class RolloutPipeline:
    """Batches launched ahead of the learner, oldest first."""

    def __init__(self, launch: Callable[[int], Launched], max_staleness: int, last_step: int,
                 barrier: Callable[[int], bool]) -> None:
        self.launch, self.max_staleness, self.last_step, self.barrier = launch, max_staleness, last_step, barrier
        self.inflight: OrderedDict[int, Launched] = OrderedDict()

    def take(self, step: int) -> Launched:
        """Step `step`'s batch (launching it if needed), after launching steps up to step + s that
        no barrier separates from `step`."""
        if step not in self.inflight:
            self.reset()
            self.inflight[step] = self.launch(step)
        ahead = step
        while ahead < min(step + self.max_staleness, self.last_step) and not self.barrier(ahead):
            ahead += 1
            if ahead not in self.inflight:
                self.inflight[ahead] = self.launch(ahead)
        return self.inflight.pop(step)

    def reset(self) -> None:
        """Forget batches in flight (after a learner restart the weights they came from are gone)."""
        self.inflight.clear()

    def __len__(self) -> int:
        return len(self.inflight)
