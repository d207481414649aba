"""Tasks: prompts with verifiable answers, fixed train/test splits, and the reward.

Registry (a plain dict) keyed by the config's `task.type`:

- `addition`: `ABC+DEF=` -> zero-padded sum `SSSS`, exact match. Splits are drawn with a fixed
  task seed (independent of `run.seed`), so every run and every actor sees the same data.
- `jsonl`: local `.jsonl` / `.parquet` files in a plain, verl or DeepMath layout (`task.format`);
  a completion is correct when `math_verify.verify(parse(answer), parse(completion))` holds
  (`reward: math_verify`), on exact match (`exact`), or for code data when the answer's Python
  tests pass (`python_tests`: assert code; `code_io`: Eurus/APPS-style stdin/stdout or call cases
  as JSON, the EffOPD paper's code data), run in the sandbox (`core/code_rewards.py`). Chat-message prompts are rendered once, here, with the student
  tokenizer's chat template, so the HF and vLLM backends (which both encode the rendered string
  with that tokenizer, no special tokens added) see the same token ids.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.config import AdditionTask, JsonlTask
from core.records import DataError, as_messages, iter_rows, lookup, record_fields

TASK_SEED = 1234


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    raw: Any = field(default=None, compare=False, hash=False)
    """The record's prompt before rendering (a message list or a string; None: `prompt` is the raw
    text): a cross-tokenizer teacher renders it with its own chat template."""
    group: str | None = field(default=None, compare=False)
    """The record's `task.group_key` value (multi-teacher routing, per-group evaluation)."""


@dataclass(frozen=True)
class Task:
    """Fixed splits plus a reward function `reward(completion, answer) -> 0.0 | 1.0`."""

    train: list[Example]
    test: list[Example]
    reward: Callable[[str, str], float]
    dropped: dict[str, int] | None = None
    """Prompts removed per split by the overlong filter (None: no filter ran)."""

    def rewards(self, completions: list[str], answers: list[str]) -> list[float]:
        """`reward` of each (completion, answer); code rewards check a batch in parallel."""
        many = getattr(self.reward, "many", None)
        if many is not None:
            return many(completions, answers)
        return [self.reward(c, a) for c, a in zip(completions, answers)]

    def validation_set(self, size: int, seed: int) -> list[Example]:
        """D_v: `size` training examples drawn once with the run's seed (EffOPD)."""
        rng = random.Random(seed * 7919 + 17)
        return rng.sample(self.train, min(size, len(self.train)))


def exact_match(completion: str, answer: str) -> float:
    return float(completion.strip() == answer.strip())


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def as_latex(expr: str) -> str:
    """A bare answer as math-verify's LaTeX input: `2\\sqrt{3}` parsed bare is 2, `\\frac{\\pi}{4}` is
    nothing; wrapped in $...$ both parse whole."""
    expr = expr.strip()
    return expr if "$" in expr or "\\boxed" in expr else f"${expr}$"


def math_verify_reward(completion: str, answer: str, timeout: int = 5) -> float:
    """1.0 when math-verify judges the completion's last `\\boxed{}` (else the whole completion)
    equal to the gold answer; parsing and verifying each stop after `timeout` seconds (0.0).
    A boxed answer spelled exactly like a gold answer that parses is correct without verifying
    (the same string is the same value); gold answers are parsed once per process."""
    from math_verify import parse, verify

    boxed = last_boxed(completion)
    gold = list(parsed_gold(answer, timeout))  # verify() takes lists
    if not gold:
        return 0.0
    if boxed is not None and boxed.strip() == answer.strip():
        return 1.0
    pred = parse(f"${boxed}$" if boxed is not None else completion, parsing_timeout=timeout)
    return float(bool(pred) and verify(gold, pred, timeout_seconds=timeout))


@functools.lru_cache(maxsize=65536)
def parsed_gold(answer: str, timeout: int) -> tuple:
    """math-verify's parse of a gold answer (wrapped as LaTeX), cached: a training set's answers
    repeat at every epoch and every sample of a prompt."""
    from math_verify import parse

    return tuple(parse(as_latex(answer), parsing_timeout=timeout))


REWARDS: dict[str, Callable[[str, str], float]] = {"math_verify": math_verify_reward, "exact": exact_match}
"""Rewards computed in this process; `python_tests` and `code_io` run in the sandbox (`reward_of`)."""


def reward_of(cfg: JsonlTask) -> Callable[[str, str], float]:
    """The reward `cfg.reward` names; code rewards bound to `cfg.sandbox` (core/code_rewards.py)."""
    if cfg.reward in REWARDS:
        return REWARDS[cfg.reward]
    from core.code_rewards import CodeReward

    return CodeReward(cfg.reward, cfg.sandbox)


def addition_pairs(digits: int, count: int, rng: random.Random, exclude: set[tuple[int, int]]) -> list[tuple[int, int]]:
    hi = 10**digits
    out: list[tuple[int, int]] = []
    seen = set(exclude)
    while len(out) < count:
        pair = (rng.randrange(hi), rng.randrange(hi))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def addition_example(a: int, b: int, digits: int) -> Example:
    return Example(prompt=f"{a:0{digits}d}+{b:0{digits}d}=", answer=f"{a + b:0{digits + 1}d}")


def build_addition(cfg: AdditionTask) -> Task:
    if cfg.train_size + cfg.test_size > 10 ** (2 * cfg.digits):
        raise ValueError(f"task: {cfg.digits}-digit addition has fewer than train_size+test_size problems")
    rng = random.Random(TASK_SEED)
    test_pairs = addition_pairs(cfg.digits, cfg.test_size, rng, set())
    train_pairs = addition_pairs(cfg.digits, cfg.train_size, rng, set(test_pairs))
    make = lambda pairs: [addition_example(a, b, cfg.digits) for a, b in pairs]  # noqa: E731
    return Task(train=make(train_pairs), test=make(test_pairs), reward=exact_match)


class PromptRenderer:
    """Prompts as the model sees them: message lists through the tokenizer's chat template
    (`apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)`);
    plain strings kept, or rendered as one user message when `chat_template` is true."""

    def __init__(self, cfg: JsonlTask, student_path: str | Path | None) -> None:
        self.cfg, self.student_path, self._tok = cfg, student_path, None

    @property
    def tokenizer(self):
        if self._tok is None:
            if self.student_path is None:
                raise ValueError("task: chat templates and the overlong-prompt filter need the student's tokenizer")
            from core.modeling import load_tokenizer

            self._tok = load_tokenizer(self.student_path)
        return self._tok

    def __call__(self, value: Any) -> str:
        """`value` is a checked prompt (`records.record_fields`); ValueError when it needs a chat
        template the student's tokenizer lacks."""
        messages = as_messages(value)
        if messages is None and not self.cfg.chat_template:
            return value
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"the prompt needs a chat template and the student's tokenizer ({self.student_path}) has none")
        return tok.apply_chat_template(messages or [{"role": "user", "content": value}], tokenize=False,
                                       add_generation_prompt=True, **self.cfg.chat_template_kwargs)

    def lengths(self, prompts: list[str]) -> list[int]:
        """Token counts as the rollout encodes prompts (no special tokens added)."""
        return [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def read_records(path: Path, cfg: JsonlTask, render: PromptRenderer) -> list[Example]:
    """The file's examples in the configured layout; a bad record is a `DataError` naming the file
    and the record (the driver's `records.check_data` finds it first, before launch)."""
    out = []
    for where, row in iter_rows(path):
        try:
            prompt, answer = record_fields(row, cfg)
            out.append(Example(prompt=render(prompt), answer=answer, raw=prompt, group=record_group(row, cfg)))
        except ValueError as err:
            raise DataError(path, where, str(err)) from None
    if not out:
        raise DataError(path, "records", "the file has none")
    return out


def record_group(row: dict, cfg: JsonlTask) -> str | None:
    """The record's group (`task.group_key`), as a string; ValueError when the column is missing."""
    if not cfg.group_key:
        return None
    try:
        return str(lookup(row, cfg.group_key))
    except KeyError:
        raise ValueError(f"no column '{cfg.group_key}' (task.group_key)") from None


def drop_overlong(examples: list[Example], render: PromptRenderer, max_tokens: int) -> list[Example]:
    """The paper's `filter_overlong_prompts`: keep prompts of at most `max_tokens` tokens."""
    lengths = render.lengths([e.prompt for e in examples])
    return [e for e, n in zip(examples, lengths) if n <= max_tokens]


def build_jsonl(cfg: JsonlTask, student_path: str | Path | None = None, max_prompt_tokens: int | None = None) -> Task:
    render = PromptRenderer(cfg, student_path)
    train, test = read_records(cfg.train_path, cfg, render), read_records(cfg.test_path, cfg, render)
    dropped = None
    if cfg.filter_overlong_prompts and max_prompt_tokens is not None and student_path is not None:
        kept_train, kept_test = drop_overlong(train, render, max_prompt_tokens), drop_overlong(test, render, max_prompt_tokens)
        dropped = {"train": len(train) - len(kept_train), "test": len(test) - len(kept_test)}
        for split, kept, path in (("train", kept_train, cfg.train_path), ("test", kept_test, cfg.test_path)):
            if not kept:
                raise DataError(path, "prompts", f"every prompt is longer than rollout.max_prompt_tokens = "
                                f"{max_prompt_tokens} tokens (after the chat template): nothing to train on")
        train, test = kept_train, kept_test
    return Task(train=train, test=test, reward=reward_of(cfg), dropped=dropped)


def eval_examples(cfg: JsonlTask, path: Path, student_path: str | Path | None = None,
                  max_prompt_tokens: int | None = None) -> list[Example]:
    """A named evaluation set (`eval.sets`): the file read in the task's layout, its prompts rendered
    and filtered exactly as the task's."""
    render = PromptRenderer(cfg, student_path)
    examples = read_records(path, cfg, render)
    if cfg.filter_overlong_prompts and max_prompt_tokens is not None and student_path is not None:
        examples = drop_overlong(examples, render, max_prompt_tokens)
    return examples


TASKS: dict[str, Callable] = {"addition": build_addition, "jsonl": build_jsonl}


def build_task(cfg: AdditionTask | JsonlTask, student_path: str | Path | None = None,
               max_prompt_tokens: int | None = None) -> Task:
    """The task's splits and reward. File tasks render chat prompts with the tokenizer at
    `student_path` and drop prompts over `max_prompt_tokens`; every actor builds the same task from
    the same arguments, so the data positions (indices) agree everywhere."""
    if isinstance(cfg, JsonlTask):
        return build_jsonl(cfg, student_path, max_prompt_tokens)
    return TASKS[cfg.type](cfg)


def task_of(acfg: dict[str, Any]) -> Task:
    """The task as an actor builds it from its actor config (`orchestrator.actor_spec.actor_config`)."""
    return build_task(acfg["task_cfg"], acfg["student_path"], acfg["rollout"]["max_prompt_tokens"])


def eval_sets_of(acfg: dict[str, Any]) -> dict[str, list[Example]]:
    """Every named evaluation set of an actor config, loaded as `eval_examples` loads it."""
    return {name: eval_examples(acfg["task_cfg"], Path(spec["path"]), acfg["student_path"],
                                acfg["rollout"]["max_prompt_tokens"])
            for name, spec in acfg.get("eval_sets", {}).items()}


@dataclass(frozen=True)
class DataSummary:
    """What the driver needs to know of a run's data (sizes, per named set) and logs as `data/*` params."""

    n_train: int
    n_test: int
    eval_set_sizes: dict[str, int]
    params: dict[str, int]
    groups: tuple[list[str | None], list[str | None]] | None = None
    """(train, test) group of every example (`task.group_key`), else None."""


def summarize(cfg: Any) -> DataSummary:
    """The run's splits as the actors will build them (`build_task`), and each evaluation set's size
    (capped by its `num_examples`); overlong prompts dropped are counted, and said."""
    import logging

    task = build_task(cfg.task, cfg.model_paths[0], cfg.rollout.max_prompt_tokens)
    params = {"data/train_prompts": len(task.train), "data/test_prompts": len(task.test)}
    if task.dropped is not None:
        params.update({f"data/overlong_dropped_{k}": v for k, v in task.dropped.items()})
        if any(task.dropped.values()):
            logging.getLogger(__name__).info("dropped overlong prompts (> %d tokens): %s",
                                             cfg.rollout.max_prompt_tokens, task.dropped)
    sizes: dict[str, int] = {}
    for name, es in cfg.eval.sets.items():
        n = len(eval_examples(cfg.task, es.path, cfg.model_paths[0], cfg.rollout.max_prompt_tokens))
        sizes[name] = params[f"data/eval_{name}_prompts"] = min(es.num_examples or n, n)
    groups = ([e.group for e in task.train], [e.group for e in task.test]) if getattr(cfg.task, "group_key", None) else None
    return DataSummary(len(task.train), len(task.test), sizes, params, groups)
