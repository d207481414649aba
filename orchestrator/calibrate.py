"""`foresight plan CONFIG --calibrate RUN`: fit the cost model to a run that happened and plan with it.

The run is a run folder (`runs/<name>`, holding `mlflow_run_id`) whose MLflow store is found next to
it (`<output_dir>/mlflow.db`, the default) or at `--calibrate-uri`, or an MLflow run id in the store
at `--calibrate-uri` (default: `runs/mlflow.db`). Its resolved config and plan params give the layout
it ran (a GPU run: its GPU type from `plan/device`, the layout from `plan/<role>/*`); its metric
history gives each role's busy seconds and the tokens it moved; `core/calibration.py` fits the
constants. The fit is written to `<run folder>/calibration.json` (a run id without its folder here:
`./calibration-<id>.json`) and the plan being made uses it (`plan.calibration`), as any later plan may.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

from core.calibration import FILE, Calibration, fit, measured_times, steady_steps, workload_shape
from core.config import ConfigError, load_config
from core.cost_model import defaults

METRICS = ("timing/rollout_busy", "timing/teacher_busy", "timing/learner_busy", "timing/sync", "timing/step",
           "timing/critical_path", "timing/eval", "timing/search", "train/response_tokens", "learner/real_tokens")


def _open_run(source: Path, uri: str | None):
    """(MLflow client, run) of a run folder or an MLflow run id."""
    import re

    from mlflow.tracking import MlflowClient

    from orchestrator.tracking import resolve_uri

    id_file = source / "mlflow_run_id"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
        uris = [uri] if uri else [f"sqlite:///{source.resolve().parent / 'mlflow.db'}"]
    elif re.fullmatch(r"[0-9a-f]{32}", str(source)):
        run_id, uris = str(source), [uri or resolve_uri(None, Path("runs"))]
    else:
        raise ConfigError("<command line>", "--calibrate", f"{source} is neither a run folder (with mlflow_run_id) nor "
                          "an MLflow run id: give the folder `foresight run` wrote (runs/<name>) or a run id")
    for candidate in uris:
        if candidate.startswith("sqlite:///") and not Path(candidate[len("sqlite:///"):]).is_file():
            continue
        client = MlflowClient(candidate)
        try:
            return client, client.get_run(run_id)
        except Exception:  # noqa: BLE001 - not in this store
            continue
    raise ConfigError("<command line>", "--calibrate", f"MLflow run {run_id} of {source} is not in {', '.join(uris)}; "
                      "name its store with --uri")


def _layout_overrides(params: dict[str, str]) -> list[str]:
    """Pin the counts the run ran with (its plan params), so its plan is resolved exactly as it ran."""
    out = [f"rollout.num_workers={params['plan/rollout/actors']}", f"teacher.num_workers={params['plan/teacher/actors']}",
           f"learner.world_size={params['plan/learner/actors']}", "plan.layout=balanced",
           f"rollout.tensor_parallel={params.get('plan/rollout/tp', 1)}",
           f"teacher.tensor_parallel={params.get('plan/teacher/tp', 1)}"]
    if params.get("plan/evaluator/actors"):
        out.append(f"method.num_evaluators={params['plan/evaluator/actors']}")
    out.append("plan.colocate=" + ("rollout_teacher" if params.get("plan/colocated") == "True" else "none"))
    return out


def calibrate(source: str | Path, uri: str | None = None) -> tuple[Path, Calibration, list[str]]:
    """Fit, save beside the run, return (path, calibration, notes)."""
    from orchestrator.plan import resolve

    from core.scales import GPU_TYPES, ClusterSpec

    source = Path(source)
    client, run = _open_run(source, uri)
    params = run.data.params
    device = params.get("plan/device", "cpu" if params.get("plan/rollout/gpus") == "0" else "")
    if device != "cpu" and device not in GPU_TYPES:
        raise ConfigError("<command line>", "--calibrate", f"{source} ran on GPUs of type '{device or 'unrecorded'}': "
                          f"the cost model knows {', '.join(GPU_TYPES)}")
    cluster = None
    if device != "cpu":  # one node holding the run's GPUs: the layout is pinned, only the device matters
        gpus = sum(int(params.get(f"plan/{r}/actors", 0)) * int(params.get(f"plan/{r}/gpus", 0))
                   for r in ("rollout", "learner", "evaluator")) + (
            0 if params.get("plan/colocated") == "True"
            else int(params.get("plan/teacher/actors", 0)) * int(params.get("plan/teacher/gpus", 0)))
        cluster = ClusterSpec(1, gpus, device, GPU_TYPES[device].mem_gb)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(client.download_artifacts(run.info.run_id, "resolved_config.yaml", tmp))
        cfg = load_config(config, _layout_overrides(params))
        history = {m: {x.step: x.value for x in client.get_metric_history(run.info.run_id, m)} for m in METRICS}
        steps = steady_steps(history)
        if len(steps) < 3:
            raise ConfigError("<command line>", "--calibrate", f"{source} has {len(steps)} steady steps (besides step 1 "
                              "and evaluation or search steps); calibrate from a run of at least 5 steps")
        sequences = cfg.rollout.batch_prompts * cfg.rollout.samples_per_prompt
        fill, prompt = workload_shape(history, steps, sequences, cfg.rollout.max_new_tokens)
        measured = measured_times(history, steps)
        start = defaults(device)
        shape = Calibration(start, fill, prompt, str(source), device, len(steps), measured)
        shape_file = shape.save(Path(tmp) / FILE)
        cfg = cfg.model_copy(update={"plan": cfg.plan.model_copy(update={"calibration": shape_file})})
        plan = resolve(cfg, config, cpus=float(os.cpu_count() or 1), cluster=cluster)
    costing, layout = plan.costing, plan.layout
    thr, notes = fit(lambda t: replace(costing, thr=t).cost(layout).seconds, start, measured)
    thr = replace(thr, source=f"measured: {source} ({len(steps)} steady steps)")
    cal = Calibration(thr, fill, prompt, str(source), device, len(steps), measured)
    folder = source if source.is_dir() else Path(params.get("run/output_dir", ".")) / params.get("run/name", "")
    dest = folder / FILE if (folder / "mlflow_run_id").is_file() else Path(f"calibration-{run.info.run_id[:8]}.json")
    return cal.save(dest), cal, notes
