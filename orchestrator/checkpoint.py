"""Driver-side run state and the checkpoint folder layout.

    <run_dir>/checkpoints/step0000050/     DeepSpeed files of every rank, each rank's
                                          foresight_rank<r>.pt (EffOPD anchor partition, RNG)
                                          and driver.json (RunState below)
    <run_dir>/checkpoints/latest          the newest complete tag, replaced atomically last

A checkpoint counts only once `latest` names it, so a process killed mid-save resumes from
the previous one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunState:
    step: int = 0
    """Last completed optimizer step (the data position: step t trains on batch t)."""
    mlflow_run_id: str | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    """EffOPD / fixed-extrapolation decisions so far."""
    skipped_steps: int = 0
    """Non-finite steps skipped so far (the optimizer did not step)."""
    consecutive_skips: int = 0
    python_rng: Any = None


def run_id_file(run_dir: Path) -> Path:
    """The MLflow run id of this run folder, written when the run starts (before any checkpoint)."""
    return run_dir / "mlflow_run_id"


def ckpt_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def latest_tag(run_dir: Path) -> str | None:
    pointer = ckpt_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if (ckpt_root(run_dir) / tag / "driver.json").is_file() else None


def write_driver_state(run_dir: Path, tag: str, state: RunState) -> None:
    state.python_rng = random.getstate()
    path = ckpt_root(run_dir) / tag / "driver.json"
    path.write_text(json.dumps(asdict(state), default=_jsonable))


def read_driver_state(run_dir: Path, tag: str) -> RunState:
    data = json.loads((ckpt_root(run_dir) / tag / "driver.json").read_text())
    state = RunState(**data)
    if state.python_rng is not None:
        version, internal, gauss = state.python_rng
        random.setstate((version, tuple(internal), gauss))
    return state


def commit(run_dir: Path, tag: str, keep: int) -> None:
    """Point `latest` at `tag` atomically, then delete all but the newest `keep` checkpoints."""
    root = ckpt_root(run_dir)
    tmp = root / "latest.tmp"
    tmp.write_text(tag)
    os.replace(tmp, root / "latest")
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step"))
    for old in tags[:-keep]:
        if old != tag:
            shutil.rmtree(root / old, ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)
