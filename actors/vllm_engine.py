"""vLLM engines inside Ray actors (`rollout.backend: vllm`, `teacher.backend: vllm`).

One `vllm.LLM` per actor, fp32, in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`: no engine-core
subprocess to orphan when Ray kills the actor), eager mode, a fixed KV-cache size on CPU. Token ids
go in and come out; the HF tokenizer of the checkpoint encodes prompts, as on the HF backend, so
both backends build the same batch layout (`core/modeling.py`).

Weight sync through the object store (CPU, and EffOPD candidates): the engine's worker extension
(`WeightSyncExtension`, called through `LLM.collective_rpc`) runs `model_runner.reload_weights` on
the learner's buckets as they are fetched, tensor by tensor, when the engine's one worker runs in
this process; the workers of a TP engine (own processes) reload from a local safetensors file
written tensor by tensor. The prefix cache is reset afterwards, or cached prompt KV from the old
weights would be reused. On GPU clusters the NCCL path in `actors/vllm_nccl.py` broadcasts rollout
weights from learner rank 0 instead.

Sampling log-probs: `logprobs_mode="processed_logprobs"`, so `logprobs` are log softmax(logits /
temperature) of each sampled token, the quantity the learner's importance correction divides by.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

EXTENSION = "actors.vllm_engine.WeightSyncExtension"


def engine_env(cache_dir: str | Path) -> None:
    """Process environment every vLLM engine here needs (call before importing vllm)."""
    cache = Path(cache_dir)
    (cache / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": str(cache),
        "TMPDIR": str(cache / "tmp"),
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
    })


def build_engine(model_path: str | Path, rollout_cfg: dict[str, Any], seed: int, cache_dir: str | Path,
                 max_model_len: int | None = None, tensor_parallel: int = 1, max_logprobs: int = 20):
    """A `vllm.LLM` on a local checkpoint (prefix caching, the weight-sync extension).

    `max_model_len`: the longest sequence it holds (prompt + response: the KV cache and CUDA graphs
    are sized for it; None: the model's context). `max_logprobs`: the most log-probs a request may
    ask for per position (vLLM refuses more than its default 20: a teacher's top-64 needs 64).

    CUDA (GPU scales): the checkpoint's dtype, `gpu_memory_utilization` of each GPU, CUDA graphs,
    tensor parallelism over the GPUs Ray gave this actor (worker processes on this node, `mp`
    executor), NCCL weight updates. CPU: fp32 (log-probs match the learner's to ~1e-6), eager,
    a fixed KV-cache size, whole-prompt prefills, no tensor parallelism."""
    engine_env(cache_dir)
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if torch.cuda.is_available():
        from actors.vllm_nccl import engine_kwargs

        kwargs.update(dtype="auto", gpu_memory_utilization=rollout_cfg["gpu_memory_utilization"], enforce_eager=False,
                      tensor_parallel_size=tensor_parallel, **engine_kwargs(rollout_cfg))
        if tensor_parallel > 1:
            kwargs["distributed_executor_backend"] = "mp"
    else:
        if tensor_parallel > 1:
            import logging

            logging.getLogger(__name__).warning("no CUDA device in this actor (CUDA_VISIBLE_DEVICES=%s): the vLLM "
                                                "engine runs on CPU without tensor parallelism (planned TP %d)",
                                                os.environ.get("CUDA_VISIBLE_DEVICES"), tensor_parallel)
        # no chunked prefill on CPU: a prompt split over two scheduler steps makes vLLM rewind its
        # seeded sampler (`Generator.set_offset`), which CPU generators do not support
        kwargs.update(dtype="float32", enforce_eager=True, enable_chunked_prefill=False, max_num_batched_tokens=8192,
                      kv_cache_memory_bytes=int(rollout_cfg["vllm_kv_cache_mb"]) * 2**20)
    return LLM(
        model=str(model_path), tokenizer=str(model_path), skip_tokenizer_init=True,
        seed=seed, max_model_len=max_model_len, max_logprobs=max(20, max_logprobs), enable_prefix_caching=True,
        logprobs_mode="processed_logprobs", worker_extension_cls=EXTENSION, disable_log_stats=True, **kwargs,
    )


class WeightSyncExtension:
    """Mixed into every vLLM worker (`worker_extension_cls`); called through `LLM.collective_rpc`."""

    def load_safetensors_file(self, path: str) -> None:
        """Reload the model in place from a safetensors file of {HF name: tensor}, one tensor at a time."""
        from actors.weights import read_safetensors

        self.model_runner.reload_weights(weights_iterator=read_safetensors(path))  # type: ignore[attr-defined]

    def load_named(self, named) -> None:
        """Reload the model in place from an iterator of (HF name, tensor), in this process."""
        self.model_runner.reload_weights(weights_iterator=iter(named))  # type: ignore[attr-defined]


def in_process(tensor_parallel: int) -> bool:
    """The engine's one worker runs in this process (no engine-core subprocess, no TP workers): a
    weight stream can go straight into its loader."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and (tensor_parallel == 1 or not torch.cuda.is_available())


def load_stream(llm, named, cache_dir: str | Path, tensor_parallel: int = 1) -> None:
    """Push a full weight stream into a running engine, tensor by tensor (no second full copy in
    memory), then drop prefix-cache entries of the old weights. An in-process engine (one worker)
    takes the stream straight into `reload_weights`; the workers of a TP engine (processes of their
    own) read it from a local safetensors file written tensor by tensor (one node)."""
    from actors.weights import write_safetensors

    if in_process(tensor_parallel):
        llm.collective_rpc("load_named", args=(named,))
        llm.reset_prefix_cache()
        return
    path = Path(cache_dir) / "tmp" / f"weights-{os.getpid()}.safetensors"
    write_safetensors(path, named)
    try:
        llm.collective_rpc("load_safetensors_file", args=(str(path),))
    finally:
        path.unlink(missing_ok=True)
    llm.reset_prefix_cache()


def sample(llm, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, temperature: float,
           seeds: list[int] | None) -> tuple[list[list[int]], list[list[float]] | None]:
    """Completions of token-id prompts: greedy when `temperature` is 0, else sampled with one seed
    per request (a retried step draws the same tokens). Returns (token ids, sampling log-probs or None)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    greedy = temperature == 0.0
    params = [SamplingParams(temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens,
                             stop_token_ids=[eos_id], logprobs=None if greedy else 0, detokenize=False,
                             seed=None if greedy else seeds[i])
              for i in range(len(prompts))]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    if greedy:
        return tokens, None
    logps = [[step[t].logprob for t, step in zip(toks, o.outputs[0].logprobs)] for toks, o in zip(tokens, outs)]
    return tokens, logps


def score(llm, sequences: list[list[int]], first: list[int], topk: int | None = None) -> list[dict[str, Any]]:
    """log p(x_j | x_<j) for j >= first[i] of every sequence, through prompt log-probs (`max_tokens=1`;
    temperature 1.0: prompt log-probs are unscaled model log-probs), in vLLM's flat form (a few flat
    lists per request instead of one Python `Logprob` object per token and rank). Per sequence:
    {"logp": [n]} and with `topk` {"topk_ids", "topk_logp": [n, k]}, n = len(seq) - first, as numpy.

    Flat layout per position j: the entry of x_j itself (its rank may exceed k), then the k most
    likely tokens by rank (x_j again among them when it is one)."""
    import numpy as np
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    k = topk or 0
    params = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=k, detokenize=False, flat_logprobs=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
    results = []
    for o, seq, f in zip(outs, sequences, first):
        flat = o.prompt_logprobs
        start = np.asarray(flat.start_indices[f:len(seq)], dtype=np.int64)
        ids, lps = np.asarray(flat.token_ids, dtype=np.int64), np.asarray(flat.logprobs, dtype=np.float32)
        if len(start) and not np.array_equal(ids[start], np.asarray(seq[f:], dtype=np.int64)):
            raise RuntimeError("vLLM prompt log-probs: the first entry of a position is not the prompt token")
        out = {"logp": lps[start]}
        if k:
            rows = start[:, None] + 1 + np.arange(k)[None, :]  # the top-k follow the token's own entry
            out["topk_ids"], out["topk_logp"] = ids[rows], lps[rows]
        results.append(out)
    return results


def to_batch(prompts: list[list[int]], responses: list[list[int]], logps: list[list[float]] | None,
             pad_id: int, eos_id: int) -> dict[str, Any]:
    """The rollout batch layout of `core.modeling.generate`: left-padded prompts, responses
    right-padded after EOS, masks, prompt width P and (when sampled) `logp` [B, R]."""
    from core.modeling import response_mask

    B, P = len(prompts), max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    prompt_BP = torch.full((B, P), pad_id, dtype=torch.long)
    pmask_BP = torch.zeros((B, P), dtype=torch.long)
    response_BR = torch.full((B, R), pad_id, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        prompt_BP[i, P - len(p):] = torch.tensor(p)
        pmask_BP[i, P - len(p):] = 1
        response_BR[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    rmask_BR = response_mask(response_BR, eos_id)
    lengths = torch.tensor([len(r) for r in responses])
    rmask_BR = rmask_BR * (torch.arange(R)[None, :] < lengths[:, None]).float()
    batch: dict[str, Any] = {
        "input_ids": torch.cat([prompt_BP, response_BR], dim=1),
        "attention_mask": torch.cat([pmask_BP, rmask_BR.long()], dim=1),
        "prompt_len": P,
        "response": response_BR,
        "response_mask": rmask_BR,
    }
    if logps is not None:
        logp_BR = torch.zeros((B, R))
        for i, lp in enumerate(logps):
            logp_BR[i, : len(lp)] = torch.tensor(lp)
        batch["logp"] = logp_BR * rmask_BR
    return batch


def score_batch(llm, batch: dict[str, Any], topk: int | None = None) -> dict[str, torch.Tensor]:
    """{"logp": [B, R]}: log p(y_t | x, y_<t) of every response token of a rollout batch (0 where
    masked); with `topk` also "topk_ids" / "topk_logp" [B, R, k], the k most likely tokens per position."""
    P, mask_BR = batch["prompt_len"], batch["response_mask"]
    prompt_mask = batch["attention_mask"][:, :P].bool()
    sequences, first = [], []
    for i in range(mask_BR.shape[0]):
        prompt = batch["input_ids"][i, :P][prompt_mask[i]].tolist()
        response = batch["response"][i][mask_BR[i].bool()].tolist()
        sequences.append(prompt + response)
        first.append(len(prompt))
    logp_BR = torch.zeros(mask_BR.shape)
    out: dict[str, torch.Tensor] = {}
    if topk:
        ids_BRK = torch.zeros((*mask_BR.shape, topk), dtype=torch.long)
        top_BRK = torch.full((*mask_BR.shape, topk), -1e4)
    for i, row in enumerate(score(llm, sequences, first, topk)):
        n = len(row["logp"])
        logp_BR[i, :n] = torch.from_numpy(row["logp"])
        if topk:
            ids_BRK[i, :n] = torch.from_numpy(row["topk_ids"])
            top_BRK[i, :n] = torch.from_numpy(row["topk_logp"])
    out["logp"] = logp_BR * mask_BR
    if topk:
        out["topk_ids"], out["topk_logp"] = ids_BRK, top_BRK
    return out
