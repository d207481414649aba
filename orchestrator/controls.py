"""Training controls the loop switches on at a step: gradient projection (`learner.grad_project_rank`
> 0, the geometry paper's intervention). At step t_p = round(grad_project_at x steps) the update so
far, U = W_t - W_0, gives each 2-D weight a basis V_K of its top-K right singular vectors, and from
then on every rank projects that weight's gradient onto it: g <- g V_K V_K^T. The basis is saved in
the run folder, so a resumed run projects onto the same one."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import ray

log = logging.getLogger(__name__)


class GradProjection:
    def __init__(self, cfg: Any, run_dir: Path) -> None:
        self.rank, self.path = cfg.learner.grad_project_rank, run_dir / "projection_basis.pt"
        self.step = max(1, round(cfg.learner.grad_project_at * cfg.run.steps))

    def starts_at(self, step: int) -> bool:
        return bool(self.rank) and step == self.step

    def active_at(self, step: int) -> bool:
        """Projecting after a resume at `step` (the basis is on disk)."""
        return bool(self.rank) and step >= self.step

    def start(self, w0: dict, w: dict, learners: Callable[..., list]) -> None:
        """V_K of each 2-D weight's update W - W_0, saved, then installed on every rank."""
        import torch

        from core.geometry import top_right_basis

        bases = {k: top_right_basis(w[k] - w0[k], self.rank) for k in w0 if w0[k].dim() == 2}
        torch.save(bases, self.path)
        self._install(bases, learners)

    def resume(self, learners: Callable[..., list]) -> None:
        import torch

        self._install(torch.load(self.path), learners)

    def _install(self, bases: dict, learners: Callable[..., list]) -> None:
        hooked = learners("set_grad_projection", [ray.put(bases)])
        log.info("rank-%d gradient projection on %d matrices", self.rank, hooked[0])
