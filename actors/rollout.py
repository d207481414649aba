"""Rollout workers: the student samples completions y ~ pi_s(.|x) at the configured temperature.

Backend `hf`: HF `generate` on the actor's GPU in the checkpoint's dtype (bf16), or fp32 on the CPU.
Backend `vllm`: an in-process vLLM engine (`VllmRolloutWorker`).
Each call carries the current `WeightsHandle`; the worker syncs first if it is behind (after a
restart, for instance).
"""

from __future__ import annotations

from typing import Any

import torch

from actors.candidates import HfScoresCandidates, VllmScoresCandidates
from actors.evalsets import ScoresEvalSets
from actors.group import Placed
from actors.weights import HoldsWeights, WeightsHandle, write_pid
from core.modeling import decode_responses, generate, greedy_accuracy, load_model, load_tokenizer, quiet_hf
from core.task import task_of


class RolloutWorker(HfScoresCandidates, ScoresEvalSets, HoldsWeights, Placed):
    """Plain Python; `ray.remote(RolloutWorker)` is applied in `actors/group.py`. Also scores EffOPD
    candidates (`score`) when the evaluator pool is borrowed."""

    role = "rollout"

    def __init__(self, cfg: dict[str, Any], index: int = 0) -> None:
        from actors import devices

        quiet_hf()
        torch.set_num_threads(1)
        self.cfg, self.index = cfg, index
        self.device = devices.device(0, f"{self.role} {index}")
        self.tokenizer = load_tokenizer(cfg["student_path"])
        self.model = load_model(cfg["student_path"], devices.compute_dtype(self.device), self.device)
        self.task = task_of(cfg)
        self.version = 0
        write_pid(cfg, self.role, index)

    def generate(self, step: int, indices: list[int], handle: WeightsHandle | None) -> dict[str, Any]:
        """Sample `samples_per_prompt` completions for train prompts `indices` (seeded by step)."""
        self.sync(handle)
        return sample_batch(self.model, self.tokenizer, self.task, self.cfg, step, indices, self.index)

    def evaluate(self, split: str, indices: list[int], handle: WeightsHandle | None) -> tuple[float, int]:
        """(sum of greedy rewards, count) over `indices` of the `train` or `test` split."""
        self.sync(handle)
        data = self.task.test if split == "test" else self.task.train
        examples = [data[i] for i in indices]
        acc = greedy_accuracy(self.model, self.tokenizer, examples, self.task.rewards, self.cfg["rollout"]["max_new_tokens"])
        return acc * len(examples), len(examples)

    def complete(self, prompts: list[str], temperature: float, seed: int | None, batch_size: int = 512) -> list[str]:
        """Decoded completions (`eval.sets`): greedy at temperature 0, else sampled, in chunks."""
        texts: list[str] = []
        for c, lo in enumerate(range(0, len(prompts), batch_size)):
            out = generate(self.model, self.tokenizer, prompts[lo:lo + batch_size], self.cfg["rollout"]["max_new_tokens"],
                           greedy=temperature == 0, temperature=temperature or 1.0,
                           seed=None if seed is None else seed + c)
            texts += decode_responses(self.tokenizer, out["response"], out["response_mask"])
        return texts


def sample_batch(model, tokenizer, task, cfg: dict[str, Any], step: int, indices: list[int], index: int) -> dict[str, Any]:
    """Rollout batch for training prompts `indices`: tokens, sampling log-probs, rewards.

    Sampling is seeded by (run seed, step, worker index), so a retried step draws the same tokens.
    """
    rc = cfg["rollout"]
    examples = [task.train[i] for i in indices for _ in range(rc["samples_per_prompt"])]
    batch = generate(model, tokenizer, [e.prompt for e in examples], rc["max_new_tokens"],
                     greedy=False, temperature=rc["temperature"], seed=sample_seed(cfg, step, index))
    texts = decode_responses(tokenizer, batch["response"], batch["response_mask"])
    batch["rewards"] = torch.tensor(task.rewards(texts, [e.answer for e in examples]))
    batch["prompt_index"] = prompt_index(indices, rc["samples_per_prompt"])
    return batch


def prompt_index(indices: list[int], samples: int) -> torch.Tensor:
    """[B] each row's training example (a cross-tokenizer teacher re-renders its prompt)."""
    return torch.tensor([i for i in indices for _ in range(samples)], dtype=torch.long)


def sample_seed(cfg: dict[str, Any], step: int, index: int) -> int:
    """Seed of rollout worker `index` at `step` (a retried step draws the same tokens)."""
    return (cfg["seed"] * 1_000_003 + step) * 97 + index


class VllmRolloutWorker(VllmScoresCandidates, ScoresEvalSets, HoldsWeights, Placed):
    """Backend `vllm`: the same API as `RolloutWorker`, sampling with an in-process vLLM engine.

    Sampling log-probs come from vLLM (`processed_logprobs`: log softmax(logits / T) of each sampled
    token); the learner's rollout importance correction divides by them. Weight sync pushes the
    learner's buckets into the running engine (`actors/vllm_engine.py`).
    """

    model_key, role = "student_path", "rollout"

    def __init__(self, cfg: dict[str, Any], index: int = 0) -> None:
        from actors.vllm_engine import build_engine

        quiet_hf()
        torch.set_num_threads(1)
        self.cfg, self.index = cfg, index
        self.tokenizer = load_tokenizer(cfg[self.model_key])
        self.task = task_of(cfg)
        engine_cfg = {**cfg["rollout"], "gpu_memory_utilization": cfg.get("engine_util", {}).get(
            self.role, cfg["rollout"]["gpu_memory_utilization"])}  # the plan's share for this role's GPUs
        self.llm = build_engine(cfg[self.model_key], engine_cfg, cfg["seed"] + index, cfg["vllm_cache_dir"],
                                max_model_len=cfg["max_model_len"][self.model_key], tensor_parallel=cfg["tp"].get(self.role, 1),
                                max_logprobs=cfg["loss"]["teacher_topk"] or 0)
        self.version = 0
        write_pid(cfg, self.role, index)

    def load_stream(self, named) -> None:
        """Reload the engine from a weight stream (one tensor in memory at a time)."""
        from actors.vllm_engine import load_stream

        load_stream(self.llm, named, self.cfg["vllm_cache_dir"], self.cfg["tp"].get(self.role, 1))

    def rewards(self, out: dict[str, Any], examples) -> float:
        """Sum of the task rewards of a batch's decoded responses."""
        texts = decode_responses(self.tokenizer, out["response"], out["response_mask"])
        return float(sum(self.task.rewards(texts, [e.answer for e in examples])))

    def nccl_join(self, address: str, port: int, rank_offset: int, world_size: int, bucket_bytes: int) -> None:
        """GPU: join learner rank 0's weight-transfer group (`actors/vllm_nccl.py`)."""
        from actors.vllm_nccl import engine_init

        engine_init(self.llm, address, port, rank_offset, world_size, bucket_bytes=bucket_bytes)
        self.nccl_joined = True

    def nccl_receive(self, meta: list, version: int) -> None:
        """GPU: receive the learner's broadcast of weights `version` (runs alongside `Learner.nccl_send`)."""
        from actors.vllm_nccl import engine_receive

        if not getattr(self, "nccl_joined", False):
            raise RuntimeError(f"{self.role} {self.index} was restarted and is not in the NCCL weight-transfer "
                               "group (a group cannot be rejoined); resume the run instead")
        engine_receive(self.llm, meta)
        self.version = version

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]

    def generate(self, step: int, indices: list[int], handle: WeightsHandle | None) -> dict[str, Any]:
        from actors.vllm_engine import sample, to_batch

        self.sync(handle)
        rc = self.cfg["rollout"]
        examples = [self.task.train[i] for i in indices for _ in range(rc["samples_per_prompt"])]
        prompts = self._encode([e.prompt for e in examples])
        base = sample_seed(self.cfg, step, self.index) * 10_007
        tokens, logps = sample(self.llm, prompts, max_new_tokens=rc["max_new_tokens"], eos_id=self.tokenizer.eos_token_id,
                               temperature=rc["temperature"], seeds=[base + i for i in range(len(prompts))])
        batch = to_batch(prompts, tokens, logps, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        texts = decode_responses(self.tokenizer, batch["response"], batch["response_mask"])
        batch["rewards"] = torch.tensor(self.task.rewards(texts, [e.answer for e in examples]))
        batch["prompt_index"] = prompt_index(indices, rc["samples_per_prompt"])
        return batch

    def greedy(self, prompts: list[str]) -> dict[str, Any]:
        """Greedy completions of `prompts` (the batch layout, without `logp`)."""
        from actors.vllm_engine import sample, to_batch

        ids = self._encode(prompts)
        tokens, _ = sample(self.llm, ids, max_new_tokens=self.cfg["rollout"]["max_new_tokens"],
                           eos_id=self.tokenizer.eos_token_id, temperature=0.0, seeds=None)
        return to_batch(ids, tokens, None, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)

    def evaluate(self, split: str, indices: list[int], handle: WeightsHandle | None) -> tuple[float, int]:
        """(sum of greedy rewards, count) over `indices` of the `train` or `test` split."""
        self.sync(handle)
        data = self.task.test if split == "test" else self.task.train
        examples = [data[i] for i in indices]
        return self.rewards(self.greedy([e.prompt for e in examples]), examples), len(examples)

    def complete(self, prompts: list[str], temperature: float, seed: int | None) -> list[str]:
        """Decoded completions (`eval.sets`): greedy at temperature 0, else one seed per request."""
        from actors.vllm_engine import sample, to_batch

        ids = self._encode(prompts)
        tokens, _ = sample(self.llm, ids, max_new_tokens=self.cfg["rollout"]["max_new_tokens"],
                           eos_id=self.tokenizer.eos_token_id, temperature=temperature,
                           seeds=None if seed is None else [seed * 10_007 + i for i in range(len(ids))])
        out = to_batch(ids, tokens, None, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        return decode_responses(self.tokenizer, out["response"], out["response_mask"])

    def logprobs(self, batch: dict[str, Any]) -> torch.Tensor:
        """log pi(y_t | x, y_<t) of the batch's response tokens under the engine's current weights
        (prompt log-probs, temperature 1), [B, R] masked: for checking a weight sync."""
        from actors.vllm_engine import score_batch

        return score_batch(self.llm, batch)["logp"]
