"""A run's MLflow record: which MLflow run a run folder continues, and what is logged once, when
that run starts (the flattened config, the plan, the data sizes, tags, the resolved config)."""

from __future__ import annotations

import logging
from typing import Any

import yaml

from orchestrator import checkpoint as ckpt
from core.code_rewards import sandbox_tags
from core.config import flatten
from orchestrator.tracking import MlflowLogger

log = logging.getLogger(__name__)


def open_record(cfg: Any, plan: Any, state: ckpt.RunState, resume: bool, parent_run_id: str | None,
                data_params: dict[str, int]) -> MlflowLogger:
    """The checkpoint's MLflow run, else the one this folder started before it crashed (its id is
    written at the start, before any checkpoint), else a new one; `state.mlflow_run_id` is set."""
    id_file = ckpt.run_id_file(plan.run_dir)
    started = id_file.read_text().strip() if resume and id_file.is_file() else None
    tracker = MlflowLogger(plan.tracking_uri, cfg.tracking.experiment, cfg.run.name,
                           run_id=state.mlflow_run_id or started,
                           artifact_root=cfg.run.output_dir / "mlartifacts", parent_run_id=parent_run_id)
    if state.mlflow_run_id is None:
        if started:
            log.info("no checkpoint yet: restarting from step 0 in MLflow run %s", started)
        state.mlflow_run_id = tracker.run_id
        id_file.write_text(tracker.run_id)
        tracker.log_params({**flatten(cfg), **plan.params(), **data_params})
        tracker.log_text(plan.describe(), "plan.txt")
        tracker.set_tags({"method": cfg.method.type, "scale": cfg.run.scale, "seed": str(cfg.run.seed),
                          "loss": cfg.loss.type, "run_dir": str(plan.run_dir.resolve()), **sandbox_tags(cfg.task)})
        tracker.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "resolved_config.yaml")
    return tracker


def close_record(tracker: MlflowLogger, final_dir: Any, decisions: list[dict], sim_to_final: list | None) -> None:
    """At the end of a run: the final checkpoint's path, the EffOPD decisions and the geometry
    monitor's similarity-to-final curve (a metric and a JSON artifact)."""
    tracker.log_text(str(final_dir), "final_checkpoint.txt")
    if decisions:
        tracker.log_json(decisions, "effopd_decisions.json")
    if sim_to_final is not None:
        for step, sim in sim_to_final:
            tracker.client.log_metric(tracker.run_id, "geometry/sim_to_final", sim, step=step)
        tracker.log_json(sim_to_final, "geometry_sim_to_final.json")
    tracker.set_tags({"final_checkpoint": str(final_dir)})
