"""The rollout pipeline's launch order (orchestrator/pipeline.py), with a recording launcher in
place of Ray: which batches are in flight, with which weights, and where it drains."""

from __future__ import annotations

import pytest

from orchestrator.pipeline import Launched, RolloutPipeline


def drive(steps: int, s: int, barriers: set[int]) -> tuple[list[Launched], list[tuple[int, list[int]]]]:
    """Run the loop's order (take(t), train t, publish W_t) and record every launch and what was in
    flight while each step trained."""
    held = {"w": 0}
    launched: list[Launched] = []

    def launch(u: int) -> Launched:
        launched.append(Launched(u, held["w"], []))
        return launched[-1]

    pipe = RolloutPipeline(launch, s, steps, lambda b: b in barriers)
    inflight = []
    for t in range(1, steps + 1):
        batch = pipe.take(t)
        assert batch.step == t
        inflight.append((t, list(pipe.inflight)))
        held["w"] = t  # learner step t done, weights published
    return launched, inflight


def test_staleness_zero_is_the_strict_loop():
    launched, inflight = drive(10, 0, set())
    assert [(b.step, b.weights_step) for b in launched] == [(t, t - 1) for t in range(1, 11)]
    assert all(not ahead for _, ahead in inflight)


@pytest.mark.parametrize("s", [1, 2, 3])
def test_no_batch_older_than_the_bound_and_every_step_launched_once(s):
    launched, inflight = drive(30, s, set())
    assert sorted(b.step for b in launched) == list(range(1, 31))
    assert max(b.staleness for b in launched) == s and min(b.staleness for b in launched) >= 0
    assert all(len(ahead) <= s for _, ahead in inflight)
    assert inflight[5] == (6, list(range(7, 7 + s)))  # steady state: s batches ahead of the learner


def test_the_pipeline_drains_at_barriers():
    launched, inflight = drive(20, 2, {5, 10, 16})
    by_step = {b.step: b for b in launched}
    for b in (5, 10, 16):
        assert by_step[b + 1].weights_step == b, "a batch after a barrier must come from the post-barrier weights"
        assert dict(inflight)[b] == [], f"nothing in flight while barrier step {b} trains"
    assert max(b.staleness for b in launched) == 2


def test_reset_relaunches_from_the_current_weights():
    held = {"w": 0}
    launched: list[Launched] = []

    def launch(u: int) -> Launched:
        launched.append(Launched(u, held["w"], []))
        return launched[-1]

    pipe = RolloutPipeline(launch, 2, 100, lambda b: False)
    for t in range(1, 6):
        pipe.take(t)
        held["w"] = t
    pipe.reset()  # a learner restart back to step 3's checkpoint
    held["w"] = 3
    assert pipe.take(4).weights_step == 3 and len(pipe) == 2
