"""Tasks: prompts with verifiable answers, fixed train/test splits, and the reward.

Registry (a plain dict) keyed by the config's `task.type`:

- `addition`: `ABC+DEF=` -> zero-padded sum `SSSS`, exact match. Splits are drawn with a fixed
  task seed (independent of `run.seed`), so every run and every actor sees the same data.
- `jsonl`: local `.jsonl` / `.parquet` files with prompt/answer columns; a completion is correct
  when `math_verify.verify(parse(answer), parse(completion))` holds (`reward: math_verify`), on
  exact match (`exact`), or for code data when the answer's Python tests pass (`python_tests`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator.config import AdditionTask, JsonlTask

TASK_SEED = 1234


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    """Fixed splits plus a reward function `reward(completion, answer) -> 0.0 | 1.0`."""

    train: list[Example]
    test: list[Example]
    reward: Callable[[str, str], float]

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
    equal to the gold answer; parsing and verifying each stop after `timeout` seconds (0.0)."""
    from math_verify import parse, verify

    boxed = last_boxed(completion)
    gold = parse(as_latex(answer), parsing_timeout=timeout)
    pred = parse(f"${boxed}$" if boxed is not None else completion, parsing_timeout=timeout)
    return float(bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=timeout))


def python_tests_reward(completion: str, tests: str, timeout: float = 10.0) -> float:
    """1.0 when the completion's code (the last ```python block, else the whole text) passes `tests`.

    Runs `python -I` in a fresh temporary folder with a timeout; no network is needed or used.
    """
    import re
    import subprocess
    import sys
    import tempfile

    blocks = re.findall(r"```(?:python)?\n(.*?)```", completion, flags=re.S)
    code = blocks[-1] if blocks else completion
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "check.py"
        script.write_text(code + "\n\n" + tests + "\n")
        try:
            proc = subprocess.run([sys.executable, "-I", str(script)], cwd=tmp, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return 0.0
    return float(proc.returncode == 0)


REWARDS: dict[str, Callable[[str, str], float]] = {
    "math_verify": math_verify_reward, "exact": exact_match, "python_tests": python_tests_reward,
}


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


def read_records(path: Path, prompt_key: str, answer_key: str) -> list[Example]:
    """Read prompt/answer records from `.jsonl` or `.parquet`; errors name the file and line."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = []
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {lineno}: invalid JSON ({err.msg})") from None
    out = []
    for i, row in enumerate(rows, 1):
        if prompt_key not in row or answer_key not in row:
            raise ValueError(f"{path}: record {i}: needs keys '{prompt_key}' and '{answer_key}'")
        out.append(Example(prompt=str(row[prompt_key]), answer=str(row[answer_key])))
    if not out:
        raise ValueError(f"{path}: no records")
    return out


def build_jsonl(cfg: JsonlTask) -> Task:
    return Task(
        train=read_records(cfg.train_path, cfg.prompt_key, cfg.answer_key),
        test=read_records(cfg.test_path, cfg.prompt_key, cfg.answer_key),
        reward=REWARDS[cfg.reward],
    )


TASKS: dict[str, Callable] = {"addition": build_addition, "jsonl": build_jsonl}


def build_task(cfg: AdditionTask | JsonlTask) -> Task:
    return TASKS[cfg.type](cfg)
