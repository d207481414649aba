"""Rollout workers: the student samples completions y ~ pi_s(.|x) at the configured temperature.

Backend `hf` (default on CPU): HF `generate`, fp32. Each call carries the current
`WeightsHandle`; the worker syncs first if it is behind (after a restart, for instance).
"""

from __future__ import annotations

from typing import Any

import torch

from actors.weights import HoldsWeights, WeightsHandle, write_pid
from orchestrator.modeling import decode_responses, generate, greedy_accuracy, load_model, load_tokenizer, quiet_hf
from orchestrator.task import build_task


class RolloutWorker(HoldsWeights):
    """Plain Python; `ray.remote(RolloutWorker)` is applied in `actors/group.py`."""

    def __init__(self, cfg: dict[str, Any], index: int = 0) -> None:
        quiet_hf()
        torch.set_num_threads(1)
        self.cfg, self.index = cfg, index
        self.tokenizer = load_tokenizer(cfg["student_path"])
        self.model = load_model(cfg["student_path"])
        self.task = build_task(cfg["task_cfg"])
        self.version = 0
        write_pid(cfg, "rollout", index)

    def generate(self, step: int, indices: list[int], handle: WeightsHandle | None) -> dict[str, Any]:
        """Sample `samples_per_prompt` completions for train prompts `indices` (seeded by step)."""
        self.sync(handle)
        return sample_batch(self.model, self.tokenizer, self.task, self.cfg, step, indices, self.index)

    def evaluate(self, split: str, indices: list[int], handle: WeightsHandle | None) -> tuple[float, int]:
        """(sum of greedy rewards, count) over `indices` of the `train` or `test` split."""
        self.sync(handle)
        data = self.task.test if split == "test" else self.task.train
        examples = [data[i] for i in indices]
        acc = greedy_accuracy(self.model, self.tokenizer, examples, self.task.reward, self.cfg["rollout"]["max_new_tokens"])
        return acc * len(examples), len(examples)


def sample_batch(model, tokenizer, task, cfg: dict[str, Any], step: int, indices: list[int], index: int) -> dict[str, Any]:
    """Rollout batch for training prompts `indices`: tokens, sampling log-probs, rewards.

    Sampling is seeded by (run seed, step, worker index), so a retried step draws the same tokens.
    """
    rc = cfg["rollout"]
    examples = [task.train[i] for i in indices for _ in range(rc["samples_per_prompt"])]
    seed = (cfg["seed"] * 1_000_003 + step) * 97 + index
    batch = generate(model, tokenizer, [e.prompt for e in examples], rc["max_new_tokens"],
                     greedy=False, temperature=rc["temperature"], seed=seed)
    texts = decode_responses(tokenizer, batch["response"], batch["response_mask"])
    batch["rewards"] = torch.tensor([task.reward(t, e.answer) for t, e in zip(texts, examples)])
    return batch
