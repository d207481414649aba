"""Memory model, measured: each role's peak memory over a few steps vs what the planner predicts for
that dtype path (`core/scales.py`), on a 64M-parameter Qwen2-architecture model on CPU.

    python benchmarks/memory_model.py [--steps 2] [--batch 128] [--learners 1,1c,2]
    python benchmarks/memory_model.py --shape real      # the `real_shape` section (also run by make test-scale)

Model: a Qwen2 config (hidden 512, 8 layers, 8 heads of 64, 2 KV heads, intermediate 2048, vocabulary
padded to 32768 so the logits terms are real; the character tokenizer uses ids < 53), random init,
saved with the tokenizer into a temp folder that also serves as the teacher.

Roles, each a real Ray actor: the HF rollout worker sampling a batch; ZeRO-3 learner groups (gloo) at
world size 1 and 2 on the fp32 CPU path, with gradient checkpointing, and in bf16 (DeepSpeed bf16 with
fp32 masters: the GPU path's states and optimizer step), the last group then with the EffOPD anchor;
the HF evaluator scoring 3 candidates streamed from that learner's weight buckets.
Measured: VmHWM (peak resident set) read from /proc/self/status inside each actor, minus its
object-store pages (RssShmem: Ray's shared-memory store, node memory every actor maps), minus the
same for a baseline actor of the same type after its imports with nothing loaded. Actors run with
MALLOC_MMAP_THRESHOLD_=65536 so the peak follows live tensors; the first learner group is run again
under glibc's defaults to show what the allocator adds (`allocator_check`).

`--shape real`: the same measurement at Qwen2.5-0.5B's shapes (`orchestrator/real_shape.py`: vocabulary
151,936, hidden 896, tied embeddings, 2 layers; 166M parameters) along the GPU's learner path: two
ZeRO-3 ranks in bf16 with fp32 masters, the model built partitioned and loaded shard by shard (the
setup peak is each rank's), then the EffOPD anchor; the HF rollout worker; ExOPD's reference scorer
(the initial student scoring a batch micro-batched with chunked logits); the HF evaluator scoring
candidates the learner formed. Written as the `real_shape` section of the same file.

Writes benchmarks/results/memory_model.json (machine, settings, model sha256, per role predicted GB
by phase, measured GB, ratio) and logs it to MLflow (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import ray  # noqa: E402
import torch  # noqa: E402

from actors.evaluator import CandidateEvaluator  # noqa: E402
from actors.group import ACTOR_ENV, ActorGroup  # noqa: E402
from actors.learner import Learner  # noqa: E402
from actors.rollout import RolloutWorker  # noqa: E402
from actors.teacher import TeacherScorer  # noqa: E402
from actors.weights import WeightsHandle  # noqa: E402
from core.scales import (GB, ModelShape, conversion_bytes, engine_mem_terms, evaluator_mem_terms,  # noqa: E402
                                 learner_mem_phases, peak_bytes)
from step_overhead import save_result  # noqa: E402

ARCH = {"vocab_size": 32768, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 64,
        "tie_word_embeddings": False}
SPEC = {"kind": "pg_reverse_kl", "lam": 1.0, "rlvr_mix": 1.0, "importance_correction": True,
        "importance_threshold": 5.0}
STATUS_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}
"""glibc: blocks of 64 KiB and more are mmap'ed and unmapped when freed, so VmHWM follows the live tensors."""


# ----------------------------------------------------------------------------- probes
def proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile, RssShmem of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_KEYS:
            out[key] = int(rest.split()[0]) * 1024
    return out


class Probe:
    """Mixin: the actor reports its own memory (read inside the actor's process)."""

    def memory(self) -> dict[str, int]:
        return proc_status()


class ProbedLearner(Probe, Learner):
    def imports_only(self) -> dict[str, int]:
        """Baseline: what `setup` imports, nothing loaded."""
        import torch.distributed  # noqa: F401
        import transformers.models.qwen2.modeling_qwen2  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

        from actors.learner import _skip_muon_import

        _skip_muon_import()
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.stage3  # noqa: F401

        return proc_status()


class ProbedRollout(Probe, RolloutWorker):
    pass


class ProbedEvaluator(Probe, CandidateEvaluator):
    pass


class ProbedScorer(Probe, TeacherScorer):
    """An HF scorer of the model at `teacher_path` (the reference role: the initial student)."""


class BareWorker(Probe, RolloutWorker):
    """Baseline of the rollout worker and the evaluator (the same actor type): its imports, tokenizer
    and task, no model."""

    def __init__(self, cfg: dict[str, Any], index: int = 0) -> None:
        import transformers.models.qwen2.modeling_qwen2  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

        import actors.rollout

        actors.rollout.load_model = lambda *args, **kwargs: None  # this actor's process only
        super().__init__(cfg, index)


# ----------------------------------------------------------------------------- model
def build_model(folder: Path, seed: int = 0) -> tuple[ModelShape, str, int]:
    """Random-init Qwen2 model + the character tokenizer saved in `folder`; (shape, sha256, params)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from core.modeling import build_tokenizer

    tok = build_tokenizer()
    cfg = Qwen2Config(**ARCH, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    shape = ModelShape("qwen2-64m", params / 1e9, ARCH["num_hidden_layers"], ARCH["hidden_size"],
                       ARCH["num_key_value_heads"], ARCH["head_dim"], ARCH["vocab_size"])
    return shape, digest, params


def actor_cfg(folder: Path, out: Path, batch: int, max_new: int, ws: int = 1, ckpt: bool = False,
              dtype: str = "fp32") -> dict[str, Any]:
    from core.config import load_config
    from orchestrator.actor_spec import actor_config

    cfg = load_config(None, [f"models.student={folder}", f"models.teacher={folder}", f"run.output_dir={out}",
                             f"learner.world_size={ws}", f"learner.gradient_checkpointing={str(ckpt).lower()}",
                             f"learner.dtype={dtype}",
                             "loss.type=pg_reverse_kl", f"rollout.batch_prompts={batch}",
                             f"rollout.max_new_tokens={max_new}"])
    return actor_config(cfg)


def model_share(peak: dict[str, int], base: dict[str, int]) -> dict[str, float]:
    """Peak minus baseline, GB: `vmhwm` (all resident pages) and `private` (without mapped object-store pages)."""
    return {"vmhwm": (peak["VmHWM"] - base["VmHWM"]) / GB,
            "private": (peak["VmHWM"] - peak["RssShmem"] - (base["VmHWM"] - base["RssShmem"])) / GB,
            "shmem": peak["RssShmem"] / GB}


# ----------------------------------------------------------------------------- roles
def options(pinned: bool) -> dict[str, Any]:
    env = {**ACTOR_ENV, **(PINNED_MALLOC if pinned else {})}
    return {"num_cpus": 0.1, "runtime_env": {"env_vars": env}}


def measure_learner(acfg: dict, ws: int, parts: list, steps: int, pinned: bool, keep: bool = False):
    """ZeRO-3 group of `ws` ranks: setup, `steps` optimizer steps; every rank's memory after setup and after."""
    from orchestrator.placement import start_learners

    group = ActorGroup(ProbedLearner, ws, lambda r: (r, ws, acfg), options(pinned))
    start_learners(group)
    setup = ray.get(group.call("memory"))
    for step in range(1, steps + 1):
        ray.get(group.call("train_step", parts, SPEC, step))
    after = ray.get(group.call("memory"))
    if not keep:
        ray.get(group.call("shutdown"))
        group.kill()
    return group, setup, after


def learner_row(shape: ModelShape, base: dict, setup: list, after: list, spec: tuple[int, bool, str], B: int,
                width: int, R: int, anchor: bool = False) -> dict[str, Any]:
    ws, ckpt, dtype = spec
    rows = -(-B // ws)
    phases = learner_mem_phases(shape, ws, rows * width, anchor, dtype=dtype, cuda=False, checkpointing=ckpt,
                                response_tokens=rows * R, intermediate=ARCH["intermediate_size"])
    worst = max(after, key=lambda m: m["VmHWM"])
    return {"predicted": peak_bytes(phases), "phases": phases, "measured": model_share(worst, base),
            "raw": {"base": base, "ranks_after_setup": setup, "ranks": after}}


def role_row(pred_terms: dict[str, float], peak: dict, base: dict, load: float = 0.0) -> dict[str, Any]:
    """A role's row; `load` > 0: the model's load peaks apart (its weights + a converted tensor)."""
    phases = {"peak": pred_terms}
    if load:
        phases["load"] = {"weights": pred_terms["weights"], "conversion": load}
    return {"predicted": max(sum(t.values()) for t in phases.values()), "phases": phases,
            "measured": model_share(peak, base), "raw": {"base": base, "peak": peak}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per learner group (the peak needs 2)")
    parser.add_argument("--batch", type=int, default=128, help="sequences per step (prompts, 1 sample each)")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--learners", default="1,1c,1b,2",
                        help="learner groups: world size, then `c` = gradient checkpointing, `b` = bf16 (DeepSpeed "
                             "bf16 with fp32 masters, the GPU path's states); the last also takes the EffOPD anchor "
                             "and one more step")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_model.json"))
    parser.add_argument("--shape", choices=["64m", "real"], default="64m",
                        help="64m: the Qwen2 64M model (the file's top level); real: Qwen2.5-0.5B's shapes (its "
                             "`real_shape` section)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the JSON only (the test-scale check)")
    args = parser.parse_args()
    if args.shape == "real":
        return measure_real(args)
    t_start = time.perf_counter()
    from orchestrator.cli import start_local_ray
    from core.extrapolation import coefficient
    from core.data_order import batch_indices

    configs = [(int(c.rstrip("bc")), "c" in c, "bf16" if "b" in c else "fp32") for c in args.learners.split(",")]
    start_local_ray(num_cpus=2, logging_level="ERROR")
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        folder = tmp / "model"
        shape, digest, params = build_model(folder)
        print(f"model: Qwen2 {params / 1e6:.1f}M parameters, sha256 {digest[:12]}", flush=True)
        acfg = actor_cfg(folder, tmp / "run", args.batch, args.max_new_tokens)

        # 1. rollout worker (HF generate, sampling) against its baseline: same actor type, no model
        t0 = time.perf_counter()
        bare = ActorGroup(BareWorker, 1, lambda i: (acfg,), options(True))
        base = ray.get(bare.actors[0].memory.remote())
        bare.kill()
        rollout = ActorGroup(ProbedRollout, 1, lambda i: (acfg,), options(True))
        batch = ray.get(rollout.actors[0].generate.remote(1, batch_indices(1, 20000, args.batch, 0), None))
        peak = ray.get(rollout.actors[0].memory.remote())
        rollout.kill()
        B, width = batch["input_ids"].shape
        R = batch["response"].shape[1]
        rows["rollout"] = role_row(engine_mem_terms(shape, 1, width, batch=B, dtype="fp32", sampled=R), peak, base)
        print(f"rollout: sampled {B} x {R} tokens (width {width}) in {time.perf_counter() - t0:.0f} s", flush=True)
        parts = [[ray.put(batch), ray.put(TeacherScorer(acfg).score(batch)), B]]

        # 2. learner groups (ZeRO-3, fp32, gloo) against a baseline rank that only imported
        probe = ActorGroup(ProbedLearner, 1, lambda r: (r, 1, acfg), options(True))
        lbase = ray.get(probe.actors[0].imports_only.remote())
        probe.kill()
        group = None
        for i, spec in enumerate(configs):
            t0 = time.perf_counter()
            cfg = actor_cfg(folder, tmp / "run", args.batch, args.max_new_tokens, *spec)
            ws = spec[0]
            group, setup, after = measure_learner(cfg, ws, parts, args.steps, True, keep=i == len(configs) - 1)
            name = learner_name(spec)
            rows[name] = learner_row(shape, lbase, setup, after, spec, B, width, R)
            print(f"{name}: {args.steps} steps, {-(-B // ws) * width} tokens per rank, in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        # the last group takes the EffOPD anchor and direction (8 bytes/param/N more) and one more step
        t0 = time.perf_counter()
        ray.get(group.call("set_anchor"))
        ray.get(group.call("direction_stats"))  # and the search's direction buffer, as after a search
        ray.get(group.call("train_step", parts, SPEC, args.steps + 1))
        after = ray.get(group.call("memory"))
        name = f"{name}_anchor"
        rows[name] = learner_row(shape, lbase, setup, after, spec, B, width, R, anchor=True)
        bucket_mb = acfg["learner"]["sync_bucket_mb"]
        coefs = [0.0, coefficient(1), coefficient(2)]
        handles = [WeightsHandle(-1, ray.get(group.call("publish_weights", bucket_mb, "candidate", c))[0]) for c in coefs]
        print(f"{name}: anchor, 1 step, weight sync in {time.perf_counter() - t0:.0f} s", flush=True)

        # 3. evaluator (HF): 3 candidates W + c (W - A) formed by the learner, streamed from its buckets
        t0 = time.perf_counter()
        ev = ActorGroup(ProbedEvaluator, 1, lambda i: (acfg,), options(True))
        ray.get(ev.actors[0].score.remote(handles))
        peak = ray.get(ev.actors[0].memory.remote())
        ev.kill()
        ray.get(group.call("shutdown"))  # the learner owns the weight buckets: it goes after the evaluator
        group.kill()
        rows["evaluator"] = role_row(evaluator_mem_terms(shape, bucket_mb=bucket_mb, batch=acfg["val_size"],
                                                         seq_len=width), peak, base)
        print(f"evaluator: {len(coefs)} candidates on {acfg['val_size']} prompts in {time.perf_counter() - t0:.0f} s",
              flush=True)

        # 4. the allocator: the first learner group again under glibc's default malloc (what actors run with)
        t0 = time.perf_counter()
        spec = configs[0]
        cfg = actor_cfg(folder, tmp / "run", args.batch, args.max_new_tokens, *spec)
        _, setup, after = measure_learner(cfg, spec[0], parts, args.steps, False)
        probe = ActorGroup(ProbedLearner, 1, lambda r: (r, 1, acfg), options(False))
        default_base = ray.get(probe.actors[0].imports_only.remote())
        probe.kill()
        check = learner_row(shape, default_base, setup, after, spec, B, width, R)
        print(f"{learner_name(spec)} under default malloc in {time.perf_counter() - t0:.0f} s", flush=True)
    ray.shutdown()

    roles = summaries(rows)
    default = summary(check)
    print(f"default malloc: {learner_name(configs[0])} measured {default['measured_gb']:.3f} GB, "
          f"ratio {default['ratio']:.2f}", flush=True)
    result = {
        "benchmark": "memory_model",
        "roles": roles,
        "max_abs_error": max(abs(r["ratio"] - 1) for r in roles.values()),
        "target": "|measured / predicted - 1| <= 0.25 for every role",
        "allocator_check": {"role": learner_name(configs[0]), "env": "glibc malloc defaults", **default,
                            "note": "glibc's dynamic mmap threshold (up to 32 MiB) serves the step's 1-30 MB "
                                    "activation and gradient blocks from the heap, and freed heap blocks stay "
                                    "resident: the peak grows past the live tensors. The roles above run with "
                                    f"{PINNED_MALLOC} so that VmHWM follows the live tensors the formulas count."},
        "settings": {"model": {"architecture": "Qwen2ForCausalLM", **ARCH, "params": params, "sha256": digest,
                               "dtype": "float32"},
                     "batch_sequences": B, "width_tokens": width, "sampled_tokens": R, "steps": args.steps,
                     "learners": [{"world_size": ws, "gradient_checkpointing": c, "dtype": d} for ws, c, d in configs],
                     "loss": SPEC["kind"], "logit_chunk_tokens": acfg["learner"]["logit_chunk_tokens"],
                     "max_tokens_per_gpu": acfg["learner"]["max_tokens_per_gpu"], "sync_bucket_mb": bucket_mb,
                     "evaluator_candidates": len(coefs), "val_size": acfg["val_size"], "actor_env": PINNED_MALLOC,
                     "measure": "peak resident set (VmHWM) of the actor minus its object-store pages (RssShmem, "
                                "shared node memory), minus the same for a baseline actor of the same type after "
                                "its imports with nothing loaded; the learner: its largest rank"},
        "machine": machine(),
        "run_time_s": time.perf_counter() - t_start,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    if "real_shape" in previous:
        result["real_shape"] = previous["real_shape"]
    save_result(result, args.out, "memory_model")
    print(f"max |ratio - 1| {result['max_abs_error']:.2f}; {result['run_time_s']:.0f} s; wrote {args.out}")
    return 0


def measure_real(args: argparse.Namespace) -> int:
    """The `real_shape` section: each role at Qwen2.5-0.5B's shapes, along the GPU's learner path."""
    from orchestrator.cli import start_local_ray
    from core.extrapolation import coefficient
    from orchestrator.real_shape import QWEN25_05B, build
    from core.scales import scorer_mem_terms
    from core.data_order import batch_indices

    t_start = time.perf_counter()
    start_local_ray(num_cpus=2, logging_level="ERROR")
    rows: dict[str, dict] = {}
    batch_prompts, max_new, ws = 8, 8, 2
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        record = build(tmp, teacher_layers=2)
        folder = tmp / "student"
        params, layers = record["student"]["params"], record["student"]["layers"]
        shape = ModelShape("qwen2.5-0.5b-shaped", params / 1e9, layers, QWEN25_05B["hidden_size"],
                           QWEN25_05B["num_key_value_heads"], QWEN25_05B["head_dim"], QWEN25_05B["vocab_size"],
                           intermediate=QWEN25_05B["intermediate_size"])
        print(f"model: Qwen2.5-0.5B-shaped, {layers} layers, {params / 1e6:.1f}M parameters", flush=True)
        acfg = actor_cfg(folder, tmp / "run", batch_prompts, max_new, ws=ws, dtype="bf16")

        # rollout worker and the reference scorer, against a baseline of the same actor kind with no model
        bare = ActorGroup(BareWorker, 1, lambda i: (acfg,), options(True))
        base = ray.get(bare.actors[0].memory.remote())
        bare.kill()
        t0 = time.perf_counter()
        rollout = ActorGroup(ProbedRollout, 1, lambda i: (acfg,), options(True))
        batch = ray.get(rollout.actors[0].generate.remote(1, batch_indices(1, 20000, batch_prompts, 0), None))
        peak = ray.get(rollout.actors[0].memory.remote())
        rollout.kill()
        B, width = batch["input_ids"].shape
        R = batch["response"].shape[1]
        convert = conversion_bytes(shape, "fp32", "bf16")  # fp32 models on CPU from the bf16 checkpoint
        rows["rollout"] = role_row(engine_mem_terms(shape, 1, width, batch=B, dtype="fp32", sampled=R), peak, base, convert)
        print(f"rollout: {B} x {R} sampled tokens in {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        scorer = ActorGroup(ProbedScorer, 1, lambda i: ({**acfg, "teacher_path": str(folder)},), options(True))
        scores = ray.get(scorer.actors[0].score.remote(batch))
        peak = ray.get(scorer.actors[0].memory.remote())
        scorer.kill()
        rows["reference"] = role_row(scorer_mem_terms(shape, tokens=B * width, chunk=acfg["learner"]["logit_chunk_tokens"],
                                                      dtype="fp32"), peak, base, convert)
        print(f"reference: scored {B} x {width} tokens in {time.perf_counter() - t0:.0f} s", flush=True)

        # the learner: two bf16 ranks built partitioned, loaded shard by shard; then the anchor and a step
        t0 = time.perf_counter()
        parts = [[ray.put(batch), ray.put(scores), B]]
        probe = ActorGroup(ProbedLearner, 1, lambda r: (r, 1, acfg), options(True))
        lbase = ray.get(probe.actors[0].imports_only.remote())
        probe.kill()
        spec = (ws, False, "bf16")
        group, setup, after = measure_learner(acfg, ws, parts, args.steps, True, keep=True)
        rows["learner_ws2_bf16"] = learner_row(shape, lbase, setup, after, spec, B, width, R)
        ray.get(group.call("set_anchor"))
        ray.get(group.call("direction_stats"))
        ray.get(group.call("train_step", parts, SPEC, args.steps + 1))
        after = ray.get(group.call("memory"))
        rows["learner_ws2_bf16_anchor"] = learner_row(shape, lbase, setup, after, spec, B, width, R, anchor=True)
        setup_row = learner_row(shape, lbase, setup, setup, spec, B, width, R)
        print(f"learner: {ws} bf16 ranks, {args.steps + 1} steps in {time.perf_counter() - t0:.0f} s", flush=True)

        # the evaluator: candidates the learner formed (bf16 buckets), loaded into an fp32 HF model
        t0 = time.perf_counter()
        bucket_mb = acfg["learner"]["sync_bucket_mb"]
        coefs = [0.0, coefficient(1)]
        handles = [WeightsHandle(-1, ray.get(group.call("publish_weights", bucket_mb, "candidate", c))[0]) for c in coefs]
        ev = ActorGroup(ProbedEvaluator, 1, lambda i: (acfg,), options(True))
        ray.get(ev.actors[0].score.remote(handles))
        peak = ray.get(ev.actors[0].memory.remote())
        ev.kill()
        ray.get(group.call("shutdown"))
        group.kill()
        rows["evaluator"] = role_row(evaluator_mem_terms(shape, bucket_mb=bucket_mb, batch=acfg["val_size"], seq_len=width,
                                                         bucket_dtype="bf16"), peak, base, convert)
        print(f"evaluator: {len(coefs)} candidates in {time.perf_counter() - t0:.0f} s", flush=True)
    ray.shutdown()

    roles = summaries(rows)
    setup_peak = max(m["VmHWM"] for m in setup)
    section = {
        "roles": roles,
        "max_abs_error": max(abs(r["ratio"] - 1) for r in roles.values()),
        "learner_setup": {"measured_gb": (setup_peak - lbase["VmHWM"]) / GB,
                          "predicted_load_gb": sum(setup_row["phases"]["load"].values()) / GB,
                          "predicted_partition_gb": sum(setup_row["phases"]["partition"].values()) / GB,
                          "full_model_bf16_gb": 2 * params / GB,
                          "note": "each rank's peak after building the model partitioned and loading its shards; "
                                  "loading the whole model per rank first (before) would hold the full bf16 model"},
        "settings": {"model": {"architecture": "Qwen2ForCausalLM", **QWEN25_05B, "num_hidden_layers": layers,
                               "params": params, "sha256": record["student"]["sha256"], "checkpoint_dtype": "bfloat16"},
                     "batch_sequences": B, "width_tokens": width, "sampled_tokens": R, "steps": args.steps + 1,
                     "learner": {"world_size": ws, "dtype": "bf16", "fp32_masters": True, "grad_accum_dtype": "fp32",
                                 "sharded_load": True},
                     "logit_chunk_tokens": acfg["learner"]["logit_chunk_tokens"], "sync_bucket_mb": bucket_mb,
                     "evaluator_candidates": len(coefs), "val_size": acfg["val_size"], "actor_env": PINNED_MALLOC},
        "target": "|measured / predicted - 1| <= 0.25 for every role",
        "machine": machine(),
        "run_time_s": time.perf_counter() - t_start,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"benchmark": "memory_model"}
    result["real_shape"] = section
    if args.no_mlflow:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    else:
        save_result(result, out, "memory_model")
    print(f"real shape: max |ratio - 1| {section['max_abs_error']:.2f}; {section['run_time_s']:.0f} s; wrote {out}")
    return 0


def learner_name(spec: tuple[int, bool, str]) -> str:
    ws, ckpt, dtype = spec
    return f"learner_ws{ws}" + ("_ckpt" if ckpt else "") + ("_bf16" if dtype == "bf16" else "")


def summaries(rows: dict[str, dict]) -> dict[str, dict]:
    """Every role's summary, printed as a table."""
    roles = {name: summary(r) for name, r in rows.items()}
    for name, r in roles.items():
        print(f"{name:24s} predicted {r['predicted_gb']:6.3f} GB  measured {r['measured_gb']:6.3f} GB  "
              f"ratio {r['ratio']:5.2f}", flush=True)
    return roles


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """GB figures of one role for the result file."""
    meas, pred = row["measured"]["private"], row["predicted"] / GB
    return {"predicted_gb": pred, "measured_gb": meas, "ratio": meas / pred,
            "measured_vmhwm_gb": row["measured"]["vmhwm"], "object_store_pages_gb": row["measured"]["shmem"],
            "predicted_gb_by_phase": {ph: {k: v / GB for k, v in terms.items()} for ph, terms in row["phases"].items()},
            "raw_bytes": row["raw"]}


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": mem / GB, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "omp_threads": os.environ.get("OMP_NUM_THREADS")}


if __name__ == "__main__":
    raise SystemExit(main())
