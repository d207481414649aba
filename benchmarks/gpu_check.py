"""Device check for a lent GPU machine: the learner's GPU path, measured.

    python -m benchmarks.gpu_check                 # on one GPU: ~0.5B and 1.5B Qwen2-config models
    python -m benchmarks.gpu_check --cpu-smoke     # here: a tiny model on CPU, so the script cannot rot

For each model: ZeRO-3 learner steps on one GPU exactly as a run takes them (`actors/learner.py`:
the model built partitioned and loaded shard by shard, bf16 compute with fp32 masters and fp32
gradient accumulation, torch's fused AdamW, gradient checkpointing, token-budget micro-batches packed
by length and trimmed, logits in sequence chunks), on a synthetic rollout batch of the paper's shape
(prompts + responses, teacher log-probs, pg_reverse_kl). The rank is placed as
`core.rendezvous.learner_env` places rank 1 of a node (its LOCAL_RANK, with this process
seeing one GPU, as Ray shows each rank), alone in its process group. Then, on the same rank: the
EffOPD identity on CUDA in bf16 (the candidate gathered from the fp32 masters == the weights after
the jump, bit for bit), a step with rank-4 gradient projection (the basis on the gradient's device).
Then HF on CUDA in bf16: sampling (`generate`, the rollout's HF backend), scoring with top-64
(`score_responses`: the HF teacher and ExOPD's reference scorer) with its peak memory beside the
planner's formula (`core.scales.scorer_mem_terms`). Writes step time, tokens/s, MFU (8 Psi
FLOPs per token: forward, backward, recompute) and peak GPU memory beside the planner's formula
(`core.scales.learner_mem_gb`) to `benchmarks/results/gpu_check.json`.

The device machine has CUDA torch and transformers but no Ray, vLLM or MLflow: this script imports
none of them (the learner's Ray calls are bypassed through `Learner.train_on`). DeepSpeed travels as
wheels: `make gpu-wheels` builds them into .cache/gpu_wheels (deepspeed, hjson, pydantic and the
rest of DeepSpeed's pure-Python requirements, for Python 3.12); on the device:
`pip install --no-deps .cache/gpu_wheels/*.whl && python -m benchmarks.gpu_check`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# as Ray shows a learner rank its one GPU: this process sees exactly one device, cuda:0
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")

import torch  # noqa: E402

from core.scales import ModelShape, learner_mem_gb  # noqa: E402

MODELS = {  # Qwen2.5-0.5B / 1.5B shapes; random weights built from the config (nothing is downloaded)
    "0.5B": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "vocab_size": 151_936, "tie_word_embeddings": True},
    "1.5B": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
             "intermediate_size": 8960, "vocab_size": 151_936, "tie_word_embeddings": True},
    "cpu-smoke": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                  "intermediate_size": 128, "vocab_size": 512, "tie_word_embeddings": True},
}
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "H20": 148e12, "L40S": 362e12}


def build_model(name: str, folder: Path, dtype: torch.dtype) -> int:
    """A Qwen2 model from the config, saved as an HF checkpoint; returns its parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(max_position_embeddings=32768, **MODELS[name])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def synthetic_batch(rows: int, prompt: int, response: int, vocab: int) -> tuple[dict, dict]:
    """A rollout batch laid out as the rollout workers lay it out, and its teacher scores."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, prompt + response), generator=gen)
    lengths = torch.randint(response // 2, response + 1, (rows,), generator=gen)
    mask_R = (torch.arange(response)[None, :] < lengths[:, None]).float()
    batch = {"input_ids": ids, "attention_mask": torch.cat([torch.ones(rows, prompt), mask_R], 1).long(),
             "prompt_len": prompt, "response": ids[:, prompt:], "response_mask": mask_R,
             "logp": -torch.rand(rows, response, generator=gen) * mask_R, "rewards": torch.zeros(rows)}
    return batch, {"logp": -torch.rand(rows, response, generator=gen) * 2 * mask_R}


def rank1_env() -> dict:
    """Learner rank 1 of a two-rank node, exactly as a run places it (`learner_env`), alone in its group."""
    from core.rendezvous import learner_env

    env = learner_env([{"node_id": "node-0", "ip": "127.0.0.1"}] * 2)[1]
    return {**env, "RANK": 0, "WORLD_SIZE": 1, "LOCAL_WORLD_SIZE": 1}


def effopd_identity(learner, coef: float = 10.0) -> dict:
    """The candidate scored (formed from the fp32 masters, gathered in the working dtype) vs the weights
    after the learner jumps there; and the masters moved by exactly coef (W - A)."""
    from core.extrapolation import extrapolate

    before = learner.partition_state()
    scored = learner.gathered_state("candidate", coef)
    learner.extrapolate(coef)
    applied = learner.gathered_state()
    after = learner.partition_state()
    masters = all(torch.equal(m1, extrapolate(m0, a, coef))
                  for m0, a, m1 in zip(before["master"], before["anchor"], after["master"]))
    return {"coef": coef, "scored_equals_applied": all(torch.equal(scored[k], applied[k]) for k in applied),
            "masters_exact": masters, "dtype": str(next(iter(applied.values())).dtype),
            "moved_tensors": sum(not torch.equal(b, a) for b, a in zip(before["master"], after["master"]))}


def hf_on_device(folder: Path, name: str, args: argparse.Namespace, cuda: bool) -> dict:
    """The HF backends on the device in its dtype: sampling (rollout), top-64 scoring (teacher, reference)."""
    from actors import devices
    from core.modeling import generate, load_model, score_responses
    from orchestrator.real_shape import build_tokenizer
    from core.scales import GB, scorer_mem_terms

    dev = devices.device(0, "gpu_check")
    model = load_model(folder, devices.compute_dtype(dev), dev)
    tok = build_tokenizer(MODELS[name]["vocab_size"])
    prompts = [f"{i:03d}+{2 * i:03d}=" for i in range(args.rows)]
    t = time.perf_counter()
    out = generate(model, tok, prompts, args.sample_tokens, greedy=False, seed=0)
    sample_s = time.perf_counter() - t
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
    t = time.perf_counter()
    scores = score_responses(model, out, topk=64, max_tokens=args.max_tokens, chunk_tokens=args.chunk)
    score_s = time.perf_counter() - t
    tokens = int(out["attention_mask"].sum())
    cfg_m = MODELS[name]
    shape = shape_of(name, sum(p.numel() for p in model.parameters()))
    pred = scorer_mem_terms(shape, tokens=min(tokens, args.max_tokens), chunk=args.chunk,
                            dtype="bf16" if cuda else "fp32")
    result = {"device": str(dev), "dtype": str(model.dtype), "sampled": list(out["response"].shape),
              "sample_seconds": round(sample_s, 3), "scored_tokens": tokens, "score_seconds": round(score_s, 3),
              "topk": list(scores["topk_ids"].shape), "finite": bool(torch.isfinite(scores["logp"]).all()),
              "predicted_scorer_gb": round(sum(pred.values()) / GB, 3), "vocab": cfg_m["vocab_size"]}
    if cuda:
        result["measured_scorer_gb"] = round((torch.cuda.max_memory_allocated() - held) / GB + pred["weights"] / GB, 3)
        result["measured_over_predicted"] = round(result["measured_scorer_gb"] / result["predicted_scorer_gb"], 3)
    return result


def shape_of(name: str, params: int) -> ModelShape:
    cfg_m = MODELS[name]
    return ModelShape(name, params / 1e9, cfg_m["num_hidden_layers"], cfg_m["hidden_size"], cfg_m["num_key_value_heads"],
                      cfg_m["hidden_size"] // cfg_m["num_attention_heads"], cfg_m["vocab_size"],
                      intermediate=cfg_m["intermediate_size"])


def check(name: str, args: argparse.Namespace, cuda: bool) -> dict:
    from actors.batching import micro_batches, row_lengths, token_batch
    from actors.learner import Learner

    tmp = Path(tempfile.mkdtemp(prefix=f"gpu_check_{name}_"))
    t0 = time.perf_counter()
    params = build_model(name, tmp, torch.bfloat16 if cuda else torch.float32)
    built = time.perf_counter() - t0
    lcfg = {"lr": 1e-6, "betas": [0.9, 0.999], "weight_decay": 0.0, "grad_clip": 1.0, "dtype": "auto",
            "gradient_checkpointing": True, "max_tokens_per_gpu": args.max_tokens, "logit_chunk_tokens": args.chunk,
            "sync_bucket_mb": 256.0}
    cfg = {"seed": 0, "student_path": str(tmp), "learner": lcfg,
           "loss": {"rlvr_mix": 1.0, "token_keep": 1.0}, "rollout": {"samples_per_prompt": 1}}
    learner = Learner(0, 1, cfg)
    port = learner.open_store("127.0.0.1")
    env = rank1_env()
    learner.setup(env, port)
    learner.set_anchor()
    learner.direction_stats()  # EffOPD's state after a search: anchor + direction (the planner counts both)
    batch, scores = synthetic_batch(args.rows, args.prompt, args.response, MODELS[name]["vocab_size"])
    x = token_batch(batch, scores)
    spec = {"kind": "pg_reverse_kl", "lam": 1.0, "rlvr_mix": 1.0, "importance_correction": True,
            "importance_threshold": 5.0}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps + 1):  # the first step warms up (allocator, kernels)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        stats = learner.train_on(batch, x, spec, step)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    tokens = int(batch["attention_mask"].sum())
    shape = shape_of(name, params)
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in gpu), None)
    out = {
        "params": params, "build_seconds": round(built, 1), "rows": args.rows, "prompt_len": args.prompt,
        "response_len": args.response, "tokens_per_step": tokens, "micro_batches": len(micro_batches(
        *row_lengths(batch), args.max_tokens)), "padded_tokens": stats["padded_tokens"], "step_seconds": round(step_s, 4),
        "tokens_per_second": round(tokens / step_s, 1), "loss_tokens": stats["tokens"],
        "mfu": round(8 * params * tokens / step_s / peak, 4) if peak else None,
        "predicted_peak_gb": round(learner_mem_gb(shape, 1, args.max_tokens), 2),
    }
    if cuda:
        out["measured_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        out["measured_over_predicted"] = round(out["measured_peak_gb"] / out["predicted_peak_gb"], 3)
    out["placed_as"] = {k: env[k] for k in ("LOCAL_RANK", "NODE_INDEX", "LOCAL_WORLD_SIZE")}
    out["visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    out["effopd_identity_bf16"] = effopd_identity(learner)
    basis = {n: torch.linalg.qr(torch.randn(p.ds_shape[1], 4))[0] for n, p in learner.engine.module.named_parameters()
             if len(p.ds_shape) == 2 and "embed" not in n}
    hooked = learner.set_grad_projection(dict(list(basis.items())[:2]))
    proj = learner.train_on(batch, x, spec, args.steps + 1)
    out["grad_projection"] = {"hooked": hooked, "skipped": proj["skipped"], "grad_norm": proj["grad_norm"]}
    learner.shutdown()
    out["hf_on_device"] = hf_on_device(tmp, name, args, cuda)
    return out


def in_subprocess(name: str, args: argparse.Namespace) -> dict:
    """One model's check in a fresh process (a clean CUDA context and process group per model); a
    failure is recorded with the end of its output instead of ending the whole check."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        argv = [sys.executable, "-m", "benchmarks.gpu_check", "--models", name, "--out", str(out)]
        for key in ("rows", "prompt", "response", "max_tokens", "chunk", "steps", "sample_tokens"):
            argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode != 0 or not out.is_file():
            return {"error": f"exit {proc.returncode}", "output_tail": (proc.stdout + proc.stderr)[-3000:]}
        return json.loads(out.read_text())["results"][name]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on CPU (checks the script runs)")
    parser.add_argument("--models", default="0.5B,1.5B")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--response", type=int, default=1536)
    parser.add_argument("--max-tokens", type=int, default=16384, help="learner.max_tokens_per_gpu")
    parser.add_argument("--chunk", type=int, default=2048, help="learner.logit_chunk_tokens")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sample-tokens", type=int, default=256, help="tokens sampled per row by HF generate")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.cpu_smoke:
        args.models, args.rows, args.prompt, args.response, args.max_tokens, args.chunk, args.steps, args.sample_tokens = (
            "cpu-smoke", 4, 8, 24, 64, 16, 1, 8)
        cuda = False
    elif not cuda:
        print("no CUDA device: run with --cpu-smoke here", file=sys.stderr)
        return 2
    names = args.models.split(",")
    results = {}
    for name in names:
        print(f"{name}: building and stepping ...", flush=True)
        results[name] = check(name, args, cuda) if len(names) == 1 else in_subprocess(name, args)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    record = {"benchmark": "gpu_check", "machine": {"gpu": torch.cuda.get_device_name(0) if cuda else None,
              "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    if not args.cpu_smoke:
        Path(args.out).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.out}")
    else:
        print(json.dumps(record)[:2000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
