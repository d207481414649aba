"""Weight handles: how new weights reach rollout workers and evaluators through the object store.

The learner's rank 0 puts the full weights once, in buckets (`Learner.publish_weights`); the
driver hands the same `WeightsHandle` (a version number and the bucket refs) to every worker.
A worker reloads only when its version differs, so a worker that Ray restarted mid-run
(back at W_0) catches up on its next call without any extra bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class WeightsHandle:
    version: int
    refs: list = field(default_factory=list)
    """ObjectRefs of {name: tensor} buckets; empty for version 0 (the checkpoint on disk)."""


def fetch_state_dict(handle: WeightsHandle) -> dict[str, torch.Tensor]:
    import ray

    state: dict[str, torch.Tensor] = {}
    for bucket in ray.get(list(handle.refs)):
        state.update(bucket)
    return state


class HoldsWeights:
    """Mixin for actors that hold a copy of the student and follow the learner's versions."""

    model: torch.nn.Module
    version: int = 0

    def sync(self, handle: WeightsHandle | None) -> bool:
        """Load `handle` if it is newer than what this actor holds; True when weights changed."""
        if handle is None or handle.version == self.version:
            return False
        if not handle.refs:
            raise RuntimeError(f"weights version {handle.version} are not in the object store (NCCL weight sync): "
                               "a restarted engine cannot rejoin the NCCL group; resume the run instead")
        self.load_weights(fetch_state_dict(handle))
        self.version = handle.version
        return True

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the held weights (HF model here; the vLLM rollout worker pushes into its engine)."""
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [m for m in missing if "rotary" not in m]
        if missing or unexpected:
            raise RuntimeError(f"weight sync mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")


def write_pid(cfg: dict, role: str, index: int) -> None:
    """Record this actor's pid under <run_dir>/actors/ (for operators, and the restart tests)."""
    import os
    from pathlib import Path

    if cfg.get("pid_dir"):
        folder = Path(cfg["pid_dir"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{role}-{index}.pid").write_text(str(os.getpid()))
