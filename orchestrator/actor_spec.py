"""What every actor is given: one plain dict built on the driver from the config and the plan
(resolved paths, the sections the actors read, each role's tensor-parallel size and engine memory
share), the sequence budget of an engine, and where vLLM caches what it learns about a model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.config import ExperimentConfig
from core.methods import method_of
from orchestrator.plan import ResolvedPlan


def actor_config(cfg: ExperimentConfig, plan: ResolvedPlan | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """The plain dict every actor receives (resolved paths, the sections it needs, each role's
    tensor-parallel size from the plan)."""
    return {
        "tp": {r.role: r.tp for r in plan.roles} if plan is not None else {},
        "engine_util": dict(plan.engine_util) if plan is not None else {},
        "seed": cfg.run.seed,
        "student_path": str(cfg.model_paths[0].resolve()),
        "teacher_path": str(cfg.model_paths[1].resolve()),
        "task_cfg": cfg.task,
        "rollout": cfg.rollout.model_dump(),
        "learner": {**cfg.learner.model_dump(), "gradient_checkpointing": plan.gradient_checkpointing if plan is not None
                    else bool(cfg.learner.gradient_checkpointing)},
        "loss": cfg.loss.model_dump(),
        "eval_sets": {name: es.model_dump(mode="json") for name, es in cfg.eval.sets.items()},
        "val_size": method_of(cfg.method).val_size,
        "val_score": method_of(cfg.method).val_score,
        "max_model_len": {"student_path": sequence_budget(cfg, cfg.model_paths[0]),
                          "teacher_path": sequence_budget(cfg, cfg.model_paths[1],
                                                          cross=bool(plan is not None and plan.cross_tokenizer))},
        "pid_dir": str((run_dir or cfg.run_dir).resolve() / "actors"),
        "vllm_cache_dir": vllm_cache_dir(),
        "cross_tokenizer": bool(plan is not None and plan.cross_tokenizer),
    }


def named_teacher_config(acfg: dict[str, Any], cfg: ExperimentConfig, folder: Path) -> dict[str, Any]:
    """The actor config of a named teacher (`models.teachers`): the trial's, with that checkpoint as
    the teacher, its sequence budget, and whether its tokenizer differs from the student's."""
    from orchestrator.plan_checks import tokenizer_difference

    cross = tokenizer_difference(cfg.model_paths[0], folder) is not None
    return {**acfg, "teacher_path": str(folder.resolve()),
            "max_model_len": {**acfg["max_model_len"], "teacher_path": sequence_budget(cfg, folder, cross=cross)},
            "cross_tokenizer": cross}


def sequence_budget(cfg: ExperimentConfig, model: Path, cross: bool = False) -> int:
    """The longest sequence an engine of `model` must hold: rollout.max_prompt_tokens +
    rollout.max_new_tokens, capped at the model's context (the plan refuses a task whose prompts and
    responses do not fit it: `orchestrator.plan.check_context`). A cross-tokenizer teacher counts
    the same text in its own tokens, which may be more: its whole context (None: twice the budget)."""
    from orchestrator.plan import model_context

    want = cfg.rollout.max_prompt_tokens + cfg.rollout.max_new_tokens
    context = model_context(model)
    if cross:
        return context or 2 * want
    return min(want, context) if context else want


def vllm_cache_dir() -> str:
    """VLLM_CACHE_ROOT and TMPDIR of vLLM engines: $FORESIGHT_VLLM_CACHE, else the user's cache
    (`$XDG_CACHE_HOME` or ~/.cache, then foresight/vllm; vLLM's own default is ~/.cache/vllm), shared
    by runs and checkouts: vLLM caches there what it learns by inspecting a model architecture in a
    subprocess (seconds per engine start in a fresh checkout otherwise)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return os.environ.get("FORESIGHT_VLLM_CACHE", str(Path(cache) / "foresight" / "vllm"))
