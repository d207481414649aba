"""Device check for a lent GPU machine: the learner's GPU path, measured.

    python -m benchmarks.gpu_check                 # on one GPU: ~0.5B and 1.5B Qwen2-config models
    python -m benchmarks.gpu_check --cpu-smoke     # here: a tiny model on CPU, so the script cannot rot

For each model: ZeRO-3 learner steps on one GPU exactly as a run takes them (`actors/learner.py`:
bf16 compute with fp32 masters, torch's fused AdamW, gradient checkpointing, token-budget
micro-batches accumulated into one optimizer step, logits in sequence chunks), on a synthetic
rollout batch of the paper's shape (prompts + responses, teacher log-probs, pg_reverse_kl). Writes
step time, tokens/s, MFU (8 Psi FLOPs per token: forward, backward, recompute) and peak GPU memory
beside the planner's formula (`orchestrator.scales.learner_mem_gb`) to
`benchmarks/results/gpu_check.json`.

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

import torch  # noqa: E402

from orchestrator.scales import ModelShape, learner_mem_gb  # noqa: E402

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


def check(name: str, args: argparse.Namespace, cuda: bool) -> dict:
    from actors.batching import micro_batches, token_batch
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
    learner.setup({"RANK": 0, "WORLD_SIZE": 1, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1, "MASTER_ADDR": "127.0.0.1"}, port)
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
    cfg_m = MODELS[name]
    shape = ModelShape(name, params / 1e9, cfg_m["num_hidden_layers"], cfg_m["hidden_size"], cfg_m["num_key_value_heads"],
                       cfg_m["hidden_size"] // cfg_m["num_attention_heads"], cfg_m["vocab_size"])
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in GPU_PEAK_FLOPS.items() if k in gpu), None)
    out = {
        "params": params, "build_seconds": round(built, 1), "rows": args.rows, "prompt_len": args.prompt,
        "response_len": args.response, "tokens_per_step": tokens, "micro_batches": len(micro_batches(args.rows,
        args.prompt + args.response, args.max_tokens)), "step_seconds": round(step_s, 4),
        "tokens_per_second": round(tokens / step_s, 1), "loss_tokens": stats["tokens"],
        "mfu": round(8 * params * tokens / step_s / peak, 4) if peak else None,
        "predicted_peak_gb": round(learner_mem_gb(shape, 1, args.max_tokens), 2),
    }
    if cuda:
        out["measured_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        out["measured_over_predicted"] = round(out["measured_peak_gb"] / out["predicted_peak_gb"], 3)
    learner.shutdown()
    return out


def in_subprocess(name: str, args: argparse.Namespace) -> dict:
    """One model's check in a fresh process (a clean CUDA context and process group per model); a
    failure is recorded with the end of its output instead of ending the whole check."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "one.json"
        argv = [sys.executable, "-m", "benchmarks.gpu_check", "--models", name, "--out", str(out)]
        for key in ("rows", "prompt", "response", "max_tokens", "chunk", "steps"):
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
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if args.cpu_smoke:
        args.models, args.rows, args.prompt, args.response, args.max_tokens, args.chunk, args.steps = (
            "cpu-smoke", 4, 8, 24, 64, 16, 1)
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
