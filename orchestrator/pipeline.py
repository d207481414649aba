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

    @property
    def staleness(self) -> int:
        return (self.step - 1) - self.weights_step


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
