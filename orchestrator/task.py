"""Tasks: prompts with verifiable answers, fixed train/test splits, and the reward.

Registry (a plain dict) keyed by the config's `task.type`:

- `addition`: `ABC+DEF=` -> zero-padded sum `SSSS`, exact match. Splits are drawn with a fixed
  task seed (independent of `run.seed`), so every run and every actor sees the same data.
- `jsonl`: local `.jsonl` / `.parquet` files in a plain, verl or DeepMath layout (`task.format`);
  a completion is correct when `math_verify.verify(parse(answer), parse(completion))` holds
  (`reward: math_verify`), on exact match (`exact`), or for code data when the answer's Python
  tests pass (`python_tests`: assert code; `code_io`: Eurus/APPS-style stdin/stdout or call cases
  as JSON, the EffOPD paper's code data). Chat-message prompts are rendered once, here, with the student
  tokenizer's chat template, so the HF and vLLM backends (which both encode the rendered string
  with that tokenizer, no special tokens added) see the same token ids.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
    dropped: dict[str, int] | None = None
    """Prompts removed per split by the overlong filter (None: no filter ran)."""

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


def completion_code(completion: str) -> str:
    """The code of a completion: its last ```python (or bare ```) block, else the whole text."""
    import re

    blocks = re.findall(r"```(?:python)?\n(.*?)```", completion, flags=re.S)
    return blocks[-1] if blocks else completion


def python_tests_reward(completion: str, tests: str, timeout: float = 10.0) -> float:
    """1.0 when the completion's code (the last ```python block, else the whole text) passes `tests`.

    Runs `python -I` in a fresh temporary folder with a timeout; no network is needed or used.
    """
    import subprocess
    import sys
    import tempfile

    code = completion_code(completion)
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "check.py"
        script.write_text(code + "\n\n" + tests + "\n")
        try:
            proc = subprocess.run([sys.executable, "-I", str(script)], cwd=tmp, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return 0.0
    return float(proc.returncode == 0)


CODE_IO_HARNESS = r"""
import contextlib, io, json, sys
cases = json.load(open(sys.argv[1]))
code = open(sys.argv[2]).read()
fn = cases.get("fn_name")
for given, want in zip(cases["inputs"], cases["outputs"]):
    scope = {"__name__": "__main__"}
    out = io.StringIO()
    if fn:  # call-based: the inputs are the arguments, the output the return value
        exec(code, scope)
        target = scope[fn] if fn in scope else getattr(scope["Solution"](), fn)
        got = target(*given) if isinstance(given, list) else target(given)
        if got != want and [got] != want:
            sys.exit(1)
        continue
    sys.stdin = io.StringIO(given if isinstance(given, str) else "\n".join(map(str, given)))
    with contextlib.redirect_stdout(out):
        exec(code, scope)
    if out.getvalue().split() != str(want).split():
        sys.exit(1)
"""


def code_io_reward(completion: str, tests: str, timeout: float = 10.0) -> float:
    """1.0 when the completion's code passes every case of APPS-style tests, as Eurus-2-RL-Data (the
    EffOPD paper's Eurus-RL-Code) stores them in `reward_model.ground_truth`: a JSON string
    `{"inputs": [...], "outputs": [...]}` run as stdin -> stdout (compared token by token), or
    with `"fn_name"` as calls `fn(*inputs[i]) == outputs[i]`. One `python -I` process runs every
    case in a temporary folder, stopped after `timeout` seconds."""
    import subprocess
    import sys
    import tempfile

    try:
        cases = json.loads(tests) if isinstance(tests, str) else tests
        if not isinstance(cases, dict) or len(cases.get("inputs", [])) != len(cases.get("outputs", [])):
            return 0.0
    except json.JSONDecodeError:
        return 0.0
    code = completion_code(completion)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"cases.json": json.dumps(cases), "solution.py": code, "harness.py": CODE_IO_HARNESS}
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        try:
            proc = subprocess.run([sys.executable, "-I", "harness.py", "cases.json", "solution.py"], cwd=tmp,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return 0.0
    return float(proc.returncode == 0)


REWARDS: dict[str, Callable[[str, str], float]] = {
    "math_verify": math_verify_reward, "exact": exact_match, "python_tests": python_tests_reward,
    "code_io": code_io_reward,
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


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Records of a `.jsonl` or `.parquet` file; errors name the file and line."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {lineno}: invalid JSON ({err.msg})") from None
    return rows


def first_record(path: Path) -> dict[str, Any]:
    """The file's first record (read without loading the rest), for checking columns up front."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1):
            rows = batch.to_pylist()
            if rows:
                return rows[0]
        raise ValueError(f"{path}: no records")
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {lineno}: invalid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {lineno}: a record must be a JSON object")
                return row
    raise ValueError(f"{path}: no records")


def lookup(row: dict[str, Any], column: str) -> Any:
    """`row[a][b]` for the dotted column `a.b`; KeyError when any part is missing."""
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(column)
        value = value[part]
    return value


def as_messages(value: Any, where: str) -> list[dict[str, str]] | None:
    """A chat message list (`[{"role": ..., "content": ...}, ...]`, as verl stores prompts), or None
    for a plain string; anything else is an error naming the record."""
    if isinstance(value, str):
        return None
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"{where}: the prompt must be a string or a list of {{role, content}} messages, "
                     f"got {type(value).__name__}")


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
            from orchestrator.modeling import load_tokenizer

            self._tok = load_tokenizer(self.student_path)
        return self._tok

    def __call__(self, value: Any, where: str) -> str:
        messages = as_messages(value, where)
        if messages is None and not self.cfg.chat_template:
            return value
        if messages is not None and self.cfg.chat_template is False:
            raise ValueError(f"{where}: a chat message list, but task.chat_template is false")
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{self.student_path}: the tokenizer has no chat template (needed for {where})")
        return tok.apply_chat_template(messages or [{"role": "user", "content": value}], tokenize=False,
                                       add_generation_prompt=True, **self.cfg.chat_template_kwargs)

    def lengths(self, prompts: list[str]) -> list[int]:
        """Token counts as the rollout encodes prompts (no special tokens added)."""
        return [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def read_records(path: Path, cfg: JsonlTask, render: PromptRenderer) -> list[Example]:
    """The file's examples in the configured layout; errors name the file, record and column."""
    prompt_key, answer_key = cfg.columns
    out = []
    for i, row in enumerate(read_rows(path), 1):
        where = f"{path}: record {i}"
        try:
            prompt, answer = lookup(row, prompt_key), lookup(row, answer_key)
        except KeyError as err:
            raise ValueError(f"{where}: no column '{err.args[0]}' (format {cfg.format})") from None
        out.append(Example(prompt=render(prompt, where), answer=str(answer)))
    if not out:
        raise ValueError(f"{path}: no records")
    return out


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
                raise ValueError(f"{path}: every prompt is longer than rollout.max_prompt_tokens = {max_prompt_tokens}")
        train, test = kept_train, kept_test
    return Task(train=train, test=test, reward=REWARDS[cfg.reward], dropped=dropped)


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
    """The task as an actor builds it from its actor config (`orchestrator.trainer.actor_config`)."""
    return build_task(acfg["task_cfg"], acfg["student_path"], acfg["rollout"]["max_prompt_tokens"])


def eval_sets_of(acfg: dict[str, Any]) -> dict[str, list[Example]]:
    """Every named evaluation set of an actor config, loaded as `eval_examples` loads it."""
    return {name: eval_examples(acfg["task_cfg"], Path(spec["path"]), acfg["student_path"],
                                acfg["rollout"]["max_prompt_tokens"])
            for name, spec in acfg.get("eval_sets", {}).items()}
