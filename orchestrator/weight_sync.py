"""How the learner's weights reach the engines: step 4 of the loop (`push`), the object-store copy
that evaluators, the monitor and the final save read (`stored`), and the EffOPD candidates' way to
the scoring pool (`score`). One interface, two transports, chosen once per run (`open_sync`):

    ObjectStoreSync  learner rank 0 puts the weights once, in buckets, in the working dtype; every
                     worker loads the same refs when its next call carries the new handle (CPU,
                     simulated GPUs, HF engines)
    NcclSync         rank 0 broadcasts from the ZeRO-3 gather to every worker of every vLLM engine
                     (`actors/vllm_nccl.py`); the object-store copy is made only when something
                     else needs it

A weights version numbers each update; a worker reloads only when the handle it is given carries a
version other than the one it holds (candidates are version -1: the next handle always reloads).
"""

from __future__ import annotations

import logging
from typing import Any

import ray

from actors.group import ActorGroup, split
from actors.weights import WeightsHandle
from core.methods import method_of
from orchestrator.placement import TrialActors, get_all, nccl_layout

log = logging.getLogger(__name__)


class WeightSync:
    """The object-store transport, and what both transports share."""

    rejoinable = True
    """A recreated learner group can take over (an NCCL group cannot be rejoined)."""

    def __init__(self, cfg: Any, plan: Any, actors: TrialActors) -> None:
        self.cfg, self.plan, self.actors = cfg, plan, actors
        self.params = method_of(cfg.method).params
        """Which weights a candidate moves (`method.params`)."""
        self.version = 0
        self.weights = WeightsHandle(0, [])
        """What the rollout workers should hold: the learner's newest weights."""

    # the learner group is replaced when a rank dies: always read it from the trial's actors
    def _learners(self, method: str, *args: Any) -> list:
        return get_all(self.actors.learner.call(method, *args))

    @property
    def pool(self) -> ActorGroup:
        """Who scores EffOPD candidates: the dedicated evaluators, else the rollout engines (borrowed)."""
        return self.actors.evaluators if self.actors.evaluators is not None else self.actors.rollout

    def restart(self) -> None:
        """After the learner was restored from a checkpoint: the workers' next handle reloads from it."""
        self.weights = WeightsHandle(self.version, [])

    def push(self) -> WeightsHandle:
        """Step 4: publish the learner's weights as a new version (object store: put once, in buckets)."""
        refs = self._learners("publish_weights", self.cfg.learner.sync_bucket_mb)
        self.version += 1
        self.weights = WeightsHandle(self.version, refs[0])
        return self.weights

    def stored(self) -> WeightsHandle:
        """The current weights in the object store (evaluators, the geometry monitor, the final save)."""
        if self.weights.version and not self.weights.refs:
            refs = self._learners("publish_weights", self.cfg.learner.sync_bucket_mb, "current")
            self.weights = WeightsHandle(self.weights.version, refs[0])
        return self.weights

    def score(self, coefs: list[float]) -> list[float]:
        """V(W_t + c (W_t - anchor)) for each c, in order. The learner forms each candidate on its fp32
        master partitions (c = 0: the current weights) and publishes it once in the working dtype; the
        pool scores one candidate per actor at a time, in rounds of the pool's size, so at most that
        many candidates are in the object store."""
        pool, scores = self.pool, []
        for lo in range(0, len(coefs), len(pool)):
            handles = [self.stored() if c == 0.0 else self._candidate(c) for c in coefs[lo:lo + len(pool)]]
            scores += [s for r in ray.get([a.score.remote([h]) for a, h in zip(pool.actors, handles)]) for s in r]
        return scores

    def _candidate(self, coef: float) -> WeightsHandle:
        refs = self._learners("publish_weights", self.cfg.learner.sync_bucket_mb, "candidate", coef, self.params)
        return WeightsHandle(-1, refs[0])


class NcclSync(WeightSync):
    """NCCL groups, each with learner rank 0 as rank 0 (the sender) and every worker of every engine
    in it (engine i's TP workers after all earlier engines' workers): `rollout`, and `evaluator` when
    the EffOPD pool is dedicated vLLM evaluators (a vLLM worker has one weight-transfer engine, so an
    engine is in one group only). Both sides of a group join at once (`open`)."""

    rejoinable = False

    def open(self) -> None:
        self.meta = self._open_group("rollout", self.actors.rollout, self.plan.role("rollout").tp)
        if self.scores_over_nccl and self.actors.evaluators is not None:
            self._open_group("evaluator", self.actors.evaluators, self.plan.role("evaluator").tp)

    def _open_group(self, name: str, engines: ActorGroup, tp: int) -> list:
        address, port = ray.get(self.actors.learner.actors[0].nccl_endpoint.remote())
        offsets, world = nccl_layout([tp] * len(engines))
        bucket = int(self.cfg.learner.sync_bucket_mb * 2**20)
        refs = self.actors.learner.call("nccl_open", address, port, world, bucket, name)
        refs += [a.nccl_join.remote(address, port, off, world, bucket) for off, a in zip(offsets, engines.actors)]
        return ray.get(refs)[0]

    @property
    def scores_over_nccl(self) -> bool:
        """Candidates go over NCCL when the pool is vLLM engines (borrowed rollout engines or dedicated
        vLLM evaluators); an HF pool reads them from the object store."""
        return (self.plan.role("evaluator") or self.plan.role("rollout")).backend == "vllm"

    def push(self) -> WeightsHandle:
        """Rank 0 broadcasts to every rollout engine worker; no object-store copy."""
        self.version += 1
        self.weights = WeightsHandle(self.version, [])
        # the engines' refs first: one that cannot receive (restarted) fails the get instead of a wait on the send
        ray.get(self.actors.rollout.call("nccl_receive", self.meta, self.version) + self.actors.learner.call("nccl_send"))
        return self.weights

    def score(self, coefs: list[float]) -> list[float]:
        """One broadcast per candidate to the whole pool; each engine scores its share of D_v:
        V = (sum of the shares' rewards) / |D_v|."""
        if not self.scores_over_nccl:
            return super().score(coefs)
        pool = self.pool
        group = "evaluator" if pool is self.actors.evaluators else "rollout"
        shares = split(list(range(self.cfg.method.val_size)), len(pool))
        scores = []
        for coef in coefs:
            received = [a.score_received.remote(self.meta, share) for a, share in zip(pool.actors, shares)]
            sent = self.actors.learner.call("nccl_send", group, "candidate" if coef else "current", coef, self.params)
            parts = ray.get(received + sent)[:len(received)]
            scores.append(sum(total for total, _ in parts) / max(sum(n for _, n in parts), 1))
        return scores


def open_sync(cfg: Any, plan: Any, actors: TrialActors) -> WeightSync:
    """The plan's transport, if the learner really has CUDA: `auto` falls back to the object store
    where torch sees no GPU (a simulated GPU cluster); an explicit `nccl` cannot."""
    if plan.weight_sync == "nccl":
        if ray.get(actors.learner.actors[0].has_cuda.remote()):
            sync = NcclSync(cfg, plan, actors)
            sync.open()
            return sync
        if cfg.learner.weight_sync == "nccl":
            raise RuntimeError("learner.weight_sync=nccl but the learner sees no CUDA device")
        log.warning("weight sync: the plan uses NCCL but the learner sees no CUDA device; using the object store")
    return WeightSync(cfg, plan, actors)
