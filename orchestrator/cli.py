"""`foresight` command line (also `python -m orchestrator`).

    foresight prepare [--workload addition|math_twin|real_shape] [--out DIR] [--force]   build teacher + student
    foresight plan CONFIG [key=value ...] [--cluster SPEC] [--objective gpu_time|time] [--calibrate RUN_DIR]
                                                            validate, print resolved config + layout
    foresight run CONFIG [key=value ...] [--no-resume]     run (resumes from the last checkpoint)
    foresight geometry --base DIR --updated DIR [--final DIR] --out FILE.json   update geometry
    foresight intervene {scale,beta,rank,window,embedding} --base DIR --final DIR [--values ...]
    foresight dashboard SWEEP [--out DIR] [--uri URI] [--experiment NAME] [--metric KEY]   comparison page, logged to MLflow

Bad input exits with code 2 and `<file>: <key>: <reason>` before anything starts or is written.
Inside `ray job submit` the run connects to the job's cluster; otherwise it starts a local Ray.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import yaml

from core.config import ConfigError, deep_merge, load_config, parse_overrides, trial_dict, validate

log = logging.getLogger("foresight")


def setup_logging() -> None:
    level = os.environ.get("FORESIGHT_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "ray", "mlflow", "alembic", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_prepare(args: argparse.Namespace) -> int:
    from orchestrator.prepare import RECIPES, prepare

    out = Path(args.out or f"models/{args.workload}")
    if args.workload == "real_shape":  # random weights at Qwen2.5-0.5B's shapes, for the CPU harness
        from orchestrator.real_shape import build

        record = build(out)
        for role in ("student", "teacher"):
            print(f"{role}: {record[role]['params']:,} params, {record[role]['layers']} layers -> {record[role]['path']}")
        return 0
    meta = prepare(out, recipe=RECIPES[args.recipe], force=args.force, workload=args.workload)
    print(f"teacher: test accuracy {meta['teacher']['test_accuracy']:.3f} ({meta['teacher']['params']} params) -> {meta['teacher']['path']}")
    print(f"student: test accuracy {meta['student']['test_accuracy']:.3f} ({meta['student']['params']} params) -> {meta['student']['path']}")
    return 0


def _load(args: argparse.Namespace) -> tuple[str | None, list, dict]:
    """Config, sweep or search file -> (sweep name or None, [(cfg, plan)], extras), all validated and
    fit-checked before anything starts. For a search, extras holds the base and the search space."""
    from core.config import read_yaml
    from orchestrator.plan import resolve
    from orchestrator.sweep import expand, is_sweep, parse_sweep, scheduler_options
    from orchestrator.tracking import check_tracking

    data = read_yaml(args.config)
    if is_sweep(data):
        parse_sweep(data, args.config)
    extras: dict = {}
    if "search" in data:
        from orchestrator.search import check_search_space, parse_search

        name = str(data.get("sweep") or Path(args.config).stem)
        base = deep_merge(data.get("base") or {}, parse_overrides(args.overrides))
        search = parse_search(data["search"], args.config)
        check_search_space(name, base, search, args.config)
        extras = {"base": base, "search": search, "scheduler": scheduler_options(data, args.config)}
        cfgs = [validate(trial_dict(base, {}, f"{name}_t000", name, args.config), args.config)]
    elif is_sweep(data):
        name, trials = expand(args.config, args.overrides)
        extras = {"scheduler": scheduler_options(data, args.config)}
        cfgs = [t.cfg for t in trials]
    else:
        name, cfgs = None, [load_config(args.config, args.overrides)]
    cluster = None
    if getattr(args, "cluster", None):
        from core.scales import parse_cluster

        try:
            cluster = parse_cluster(args.cluster)
        except ValueError as err:
            raise ConfigError("<command line>", "--cluster", str(err)) from None
    from orchestrator.plan import cluster_resources

    resources = cluster_resources()
    plans = [(cfg, resolve(cfg, args.config, cluster=cluster, resources=resources)) for cfg in cfgs]
    check_tracking([plan.tracking_uri for _, plan in plans if not plan.dry_run], args.config)
    from orchestrator.teacher_pool import assign_pools

    replicas = extras["scheduler"].teacher_replicas if "scheduler" in extras else None
    extras["pools"] = assign_pools(name or cfgs[0].run.name, plans, args.config, replicas)
    return name, plans, extras


def cmd_plan(args: argparse.Namespace) -> int:
    if args.objective:
        args.overrides = [*args.overrides, f"plan.objective={args.objective}"]
    if args.calibrate:
        from orchestrator.calibrate import calibrate

        path, cal, notes = calibrate(args.calibrate, args.calibrate_uri)
        t = cal.throughput
        print(f"# calibration from {args.calibrate} ({cal.steps} steady steps), written to {path}:")
        print(f"  decode_bw {t.decode_bw:.4g}, prefill_mfu {t.prefill_mfu:.4g}, train_mfu {t.train_mfu:.4g}, "
              f"sync {t.sync_bytes_per_s:.3g} B/s, driver {t.latency_step:.3g} s/step; fill {cal.fill:.3f}, "
              f"prompt {cal.prompt_len:.1f} tokens")
        print("  measured median s: " + ", ".join(f"{k} {v:.4g}" for k, v in cal.measured.items()))
        for note in notes:
            print(f"  note: {note}")
        args.overrides = [*args.overrides, f"plan.calibration={path}"]
    sweep, plans, extras = _load(args)
    if "search" in extras:
        s = extras["search"]
        print(f"# search {sweep}: {s.n_trials} Optuna trials ({s.sampler}, pruner {s.pruner}), {s.objective}")
        for key, p in s.params.items():
            print(f"  {key}: {p.model_dump(exclude_none=True)}")
    elif sweep:
        print(f"# sweep {sweep}: {len(plans)} trials")
    for cfg, plan in plans:
        if not args.brief:
            print(f"# resolved config: {cfg.run.name}")
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
        print(f"# plan: {cfg.run.name}")
        print(plan.describe())
    if extras["pools"]:
        print(f"# teacher pools (teacher.shared, models.teachers): {len(extras['pools'])}")
        for pool in extras["pools"]:
            print(pool.describe())
    if plans[0][1].gpu:
        total = sum(p.reserved_gpu_hours for _, p in plans)
        print(f"# total: {len(plans)} trials, ~{total:,.0f} reserved GPU-hours on {plans[0][1].cluster} "
              "(each trial's own GPUs x its wall time)")
        if sweep and "search" not in extras:
            _compare_sharing(args, plans, extras["pools"])
    if getattr(args, "probe", False):
        probe(plans)
    return 0


def _compare_sharing(args: argparse.Namespace, plans: list, pools: list) -> None:
    """The sweep on its cluster with shared teacher pools and with a teacher per trial
    (`orchestrator/sweep_cost.py`): the configured way and the other one."""
    import copy

    from orchestrator.sweep_cost import describe, sweep_cost

    shared = bool(pools)
    other = copy.copy(args)
    other.overrides = [o for o in args.overrides if not o.startswith("teacher.shared=")] + \
        [f"teacher.shared={str(not shared).lower()}"]
    _, alt_plans, alt_extras = _load(other)
    ways = {True: (plans, pools), False: (alt_plans, alt_extras["pools"])} if shared else \
        {True: (alt_plans, alt_extras["pools"]), False: (plans, pools)}
    costs = {way: sweep_cost(*ways[way]) for way in ways}
    print(f"# teacher: shared pools vs a teacher per trial ({'configured' if shared else 'with teacher.shared=true'}: "
          f"shared; trials placed as Tune places them)")
    print(describe("shared pools", costs[True]))
    print(describe("teacher per trial", costs[False]))
    if costs[True] and costs[False]:
        change = costs[True].gpu_hours - costs[False].gpu_hours
        print(f"  shared pools vs a teacher per trial: {change:+,.0f} reserved GPU-hours "
              f"({change / costs[False].gpu_hours:+.0%}), {costs[True].hours - costs[False].hours:+,.1f} h of wall time")


def probe(plans: list) -> None:
    """Place each trial's actors on the live cluster as `run` would (probes that load nothing) and
    print where every actor landed."""
    from orchestrator.placement import probe_placements

    if plans[0][1].dry_run:
        raise ConfigError("<command line>", "--probe", "places actors on the live Ray cluster; drop --cluster")
    connect_ray(plans[0][1].available_cpus)
    for cfg, plan in plans:
        print(f"# placement: {cfg.run.name}")
        for role, places in probe_placements(plan).items():
            for i, p in enumerate(places):
                print(f"  {role:<10} {i:>3}  node {p['node_id'][:12]} ({p['ip']})  GPUs {','.join(p['gpu_ids']) or '-'}")


def connect_ray(num_cpus: float) -> None:
    """Join the job's cluster under `ray job submit` ($RAY_ADDRESS); else start a local one."""
    import ray

    from actors.group import ACTOR_ENV

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
    else:
        start_local_ray(num_cpus=max(1, int(num_cpus)), runtime_env={"env_vars": dict(ACTOR_ENV)})


def start_local_ray(**kwargs) -> None:
    """A fresh single-node Ray cluster (even if another `ray start` runs on this machine) whose
    services all listen on 127.0.0.1 only.

    Ray binds its GCS, raylet, object manager, worker and agent ports to the node's IP address, or to
    loopback when it runs as a single-machine cluster; `_node_ip_address="127.0.0.1"` alone is
    replaced by the routable address. Turning off `ENABLE_RAY_CLUSTER` (what
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 does at import) keeps the node on 127.0.0.1."""
    import ray
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the workers Ray starts read it at import
    kwargs.setdefault("logging_level", "WARNING")
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.checkpoint import latest_tag
    from orchestrator.sweep import ui_hint
    from orchestrator.trainer import done_marker

    sweep, plans, extras = _load(args)
    if args.no_resume:
        from orchestrator.checkpoint import run_id_file

        for cfg, plan in plans:
            if latest_tag(plan.run_dir) or done_marker(plan.run_dir).is_file() or run_id_file(plan.run_dir).is_file():
                raise ConfigError(args.config, "run.name", f"{plan.run_dir} already holds a run; --no-resume would "
                                  "overwrite it: pick another run.name or run.output_dir, or delete the folder")
    connect_ray(plans[0][1].available_cpus)
    cfg0, plan0 = plans[0]
    from orchestrator import teacher_pool

    with teacher_pool.stopped_after(extras["pools"]):
        if not sweep:
            run_single(cfg0, plan0, args)
            print(ui_hint(plans))
            return 0
        return _run_sweep(args, sweep, plans, extras)


def _run_sweep(args: argparse.Namespace, sweep: str, plans: list, extras: dict) -> int:
    from orchestrator.sweep import close_parent_run, open_parent_run, ui_hint

    parent, ok = open_parent_run(sweep, plans), False
    try:
        from orchestrator.plan import cluster_resources
        from orchestrator.scheduler import SweepSpec, run_search, run_sweep

        opts = extras["scheduler"]
        if "search" in extras:
            spec = SweepSpec(sweep, parent, str(args.config), base=extras["base"], search=extras["search"],
                             resources=cluster_resources(), pools=extras["pools"])
            result = run_search(spec, max_retries=opts.max_retries, max_concurrent=opts.max_concurrent)
        else:
            spec = SweepSpec(sweep, parent, str(args.config), trials={cfg.run.name: (cfg, plan) for cfg, plan in plans},
                             pools=extras["pools"])
            result = run_sweep(spec, max_retries=opts.max_retries, max_concurrent=opts.max_concurrent)
        ok = result.ok
    finally:
        close_parent_run(plans, parent, ok)
    print(ui_hint(plans))
    print(f"dashboard: foresight dashboard {sweep}")
    return 0 if ok else 1


def run_single(cfg, plan, args: argparse.Namespace) -> None:
    """One experiment in this process, with a progress bar."""
    from orchestrator.trainer import OPDTrainer, done_marker

    if done_marker(plan.run_dir).is_file():
        print(f"{cfg.run.name}: already finished ({done_marker(plan.run_dir)}), skipped")
        return
    log.info("resolved config:\n%s", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
    log.info("plan:\n%s", plan.describe())
    trainer = OPDTrainer(cfg, plan, resume=not args.no_resume, show_progress=sys.stderr.isatty() or args.progress)
    try:
        final = trainer.run()
    finally:
        trainer.shutdown()
    print(f"done: {cfg.run.name} ({cfg.method.type}) final test accuracy {final.get('eval/accuracy', float('nan')):.3f}")


def cmd_geometry(args: argparse.Namespace) -> int:
    from core.geometry import GeometryOptions, analyze

    for flag in ("base", "updated", "final"):
        folder = getattr(args, flag)
        if folder and not Path(folder).is_dir():
            raise ConfigError("<command line>", f"--{flag}", f"no such checkpoint folder: {folder}")
    opts = GeometryOptions(svd=args.svd, rotation_k=args.rotation_k, sim_k=args.sim_k, mask_rank=args.mask_rank)
    report = analyze(Path(args.base), Path(args.updated), Path(args.final) if args.final else None, opts,
                     progress=sys.stderr.isatty())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report.to_json())
    o = report.overall
    print(f"{len(report.matrices)} matrices: stable rank {o['stable_rank']:.2f}, spectral/Frobenius "
          f"{o['spectral_fro_ratio']:.3f}, top-1% ratio {o['top1pct_ratio']:.3f}, bf16 sparsity "
          f"{o['bf16_sparsity_param_weighted']:.3f} -> {args.out}")
    return 0


def _state(folder: str):
    from core.geometry import Checkpoint

    return Checkpoint(Path(folder)).state_dict()


def cmd_intervene(args: argparse.Namespace) -> int:
    from orchestrator.interventions import INTERVENTIONS
    from core.modeling import greedy_accuracy, load_model, load_tokenizer
    from core.task import build_task
    from orchestrator.tracking import MlflowLogger, resolve_uri

    for flag in ("base", "final", "early"):
        folder = getattr(args, flag)
        if folder and not (Path(folder) / "config.json").is_file():
            raise ConfigError("<command line>", f"--{flag}", f"no HF checkpoint at {folder}")
    if args.kind == "beta" and not args.early:
        raise ConfigError("<command line>", "--early", "the beta intervention needs an early checkpoint")
    cfg = load_config(args.config, []) if args.config else load_config(None, [])
    task = build_task(cfg.task, args.base, cfg.rollout.max_prompt_tokens)
    examples = task.test[: args.examples]
    w0, wf = _state(args.base), _state(args.final)
    early = _state(args.early) if args.early else None
    model, tok = load_model(args.base), load_tokenizer(args.base)
    fn = INTERVENTIONS[args.kind]
    values = [float(v) for v in args.values.split(",")] if args.values else [math.nan]
    tracker = MlflowLogger(resolve_uri(args.uri, Path("runs")), "interventions", f"{args.kind}",
                           artifact_root=Path("runs") / "mlartifacts")
    tracker.log_params({"kind": args.kind, "base": args.base, "final": args.final, "early": args.early,
                        "values": args.values, "keep": args.keep, "module": args.module, "radius": args.radius})
    rows = []
    for i, v in enumerate(values):
        if args.kind == "scale":
            state = fn(w0, wf, v)
        elif args.kind == "beta":
            state = fn(w0, early, wf, v)
        elif args.kind == "rank":
            state = fn(w0, wf, v, args.keep)
        elif args.kind == "window":
            state = fn(w0, wf, args.module, int(v), args.radius)
        else:
            state = fn(w0, wf)
        model.load_state_dict(state, strict=False)
        acc = greedy_accuracy(model, tok, examples, task.rewards, cfg.rollout.max_new_tokens)
        rows.append({"value": v, "accuracy": acc})
        tracker.log(i, {f"{args.kind}/value": v, f"{args.kind}/accuracy": acc})
        print(f"{args.kind} {v:g}: accuracy {acc:.3f}")
    tracker.log_json(rows, f"{args.kind}.json")
    tracker.close()
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Render the comparison page of a sweep (or one run) from MLflow and log it to the parent run."""
    from dashboards.dashboard import build
    from dashboards.mlflow_ui import ui_command
    from dashboards.store import NotFound
    from orchestrator.tracking import resolve_uri

    uri = resolve_uri(args.uri, Path("runs"))
    out = Path(args.out or Path("runs") / "dashboards" / args.sweep)
    try:
        result = build(uri, args.sweep, out, args.experiment, log_artifacts=not args.no_log, metric=args.metric)
    except NotFound as err:
        raise ConfigError("<command line>", "sweep", str(err)) from None
    from dashboards.page import text_tables

    for note in result.notes:
        print(f"note: {note}")
    print(text_tables(result.analysis) or "no speed-up table yet (needs vanilla runs with two evaluations)")
    print(f"dashboard: {result.page.resolve()} ({len(result.images)} images)")
    if result.logged_to:
        print(f"logged to MLflow run {result.logged_to} (artifacts dashboard/)")
    if ui_command(uri):
        print(f"MLflow UI: {ui_command(uri)}")
    print(f"then open: {result.ui_url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foresight", description="On-policy distillation and EffOPD on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build the embedded teacher and student models (SFT, seeded)")
    p.add_argument("--workload", choices=["addition", "math_twin", "real_shape"], default="addition",
                   help="addition: the demo's task (Llama, character tokenizer); math_twin: the paper's workload "
                        "at CPU size (verl parquet, BPE tokenizer + chat template, math-verify, Qwen2); real_shape: "
                        "random Qwen2.5-0.5B-shaped models (151,936-token vocabulary, 2 layers) for the CPU harness")
    p.add_argument("--out", default=None, help="output folder (default: models/<workload>)")
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--recipe", choices=["default", "quick"], default="default",
                   help="quick: ten SFT steps per model (a determinism check, not usable models)")
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser("geometry", help="parameter-geometry diagnostics of an update (HF safetensors checkpoints)")
    p.add_argument("--base", required=True, help="W_0 checkpoint folder")
    p.add_argument("--updated", required=True, help="W_+ checkpoint folder")
    p.add_argument("--final", help="final checkpoint folder, for Sim_K to the final update")
    p.add_argument("--out", required=True, help="output JSON (schema: core/geometry.py GeometryReport)")
    p.add_argument("--svd", choices=["full", "randomized"], default="full", help="SVD of Delta W (default exact)")
    p.add_argument("--rotation-k", type=int, default=512, help="top-k singular subspaces for principal angles")
    p.add_argument("--sim-k", type=int, default=16, help="K of Sim_K")
    p.add_argument("--mask-rank", type=int, default=64, help="rank of the W_0 reconstruction for the principal mask")
    p.set_defaults(fn=cmd_geometry)
    p = sub.add_parser("intervene", help="weight-space interventions on an update, evaluated on the task")
    p.add_argument("kind", choices=["scale", "beta", "rank", "window", "embedding"])
    p.add_argument("--base", required=True, help="W_0 checkpoint folder")
    p.add_argument("--final", required=True, help="final checkpoint folder")
    p.add_argument("--early", help="early checkpoint folder (beta)")
    p.add_argument("--values", help="comma-separated: alpha (scale), beta (beta), percent (rank), centre layer (window)")
    p.add_argument("--keep", choices=["top", "bottom"], default="top", help="rank: keep top or bottom components")
    p.add_argument("--module", choices=["mlp", "attention"], default="mlp", help="window: which updates to inject")
    p.add_argument("--radius", type=int, default=8, help="window: +- layers around the centre")
    p.add_argument("--config", help="experiment YAML whose task is used (default: embedded addition)")
    p.add_argument("--examples", type=int, default=500, help="test examples to evaluate")
    p.add_argument("--uri", help="MLflow tracking URI (default: runs/mlflow.db)")
    p.set_defaults(fn=cmd_intervene)
    p = sub.add_parser("dashboard", help="comparison page of a sweep's trials (HTML + PNGs), logged to its MLflow parent run")
    p.add_argument("sweep", help="sweep name (its parent run's name), or a single run's name")
    p.add_argument("--out", help="output folder (default: runs/dashboards/SWEEP)")
    p.add_argument("--uri", help="MLflow tracking URI: sqlite:///... or a server http://host:port "
                                 "(default: $MLFLOW_TRACKING_URI or runs/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the sweep's name)")
    p.add_argument("--no-log", action="store_true", help="write the page only; log nothing to MLflow")
    p.add_argument("--metric", default="eval/accuracy",
                   help="target accuracy of the curves and speed-up table, e.g. eval/aime24/mean_at_32 (eval.sets)")
    p.set_defaults(fn=cmd_dashboard)
    for name, fn, helptext in (("plan", cmd_plan, "validate a config and print the resolved config and actor layout"),
                               ("run", cmd_run, "run an experiment (resumes from its last checkpoint)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", help="experiment YAML (e.g. experiments/smoke.yaml)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=3e-5 run.seed=1")
        if name == "plan":
            p.add_argument("--cluster", help="check against a cluster spec without GPUs, e.g. 4x8xH100-80GB "
                                             "or a YAML file (nodes, gpus_per_node, gpu, gpu_mem_gb)")
            p.add_argument("--brief", action="store_true", help="print only the plans, not the resolved configs")
            p.add_argument("--probe", action="store_true", help="place the actors on the live Ray cluster as `run` "
                                                                "would (loading nothing) and print where each landed")
            p.add_argument("--objective", choices=("gpu_time", "time"),
                           help="what a balanced GPU layout minimizes: GPUs x wall time (default) or wall time")
            p.add_argument("--calibrate", metavar="RUN_DIR",
                           help="fit the cost model to a run folder's measured busy times, save "
                                "RUN_DIR/calibration.json and plan with it (plan.calibration)")
            p.add_argument("--calibrate-uri", help="MLflow store of the --calibrate run (default: "
                                                   "<its output_dir>/mlflow.db)")
        if name == "run":
            p.add_argument("--no-resume", action="store_true",
                           help="start from W_0; refused if the run folder already holds a run")
            p.add_argument("--progress", action="store_true", help="show the progress bar even without a TTY")
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with the same command", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a run that stopped on purpose says why, without a traceback
        from orchestrator.placement import LearnerLost, SharedDirError
        from core.step_metrics import NonFiniteSteps

        if not isinstance(err, (LearnerLost, NonFiniteSteps, SharedDirError)):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
