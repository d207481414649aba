"""User data files (`.jsonl`, `.parquet`): read streamed, and checked whole on the driver before
anything launches (`check_data`), so a bad row is a `<file>: <line|record N>: <reason>` error with
exit code 2 instead of an actor's traceback after the cluster started.

What a record must have, and what happens otherwise (README, "Bring your data"):
  error          invalid JSON, a record that is not an object, a missing prompt or answer column,
                 a prompt that is neither a non-empty string nor a list of {role, content} messages,
                 a message list with `task.chat_template: false`, a null or empty answer, a code
                 answer that is not runnable cases (`code_io`: {"inputs", "outputs"} of equal,
                 non-zero length; `python_tests`: non-empty test code), an empty file, a file whose
                 every prompt is over `rollout.max_prompt_tokens`;
  counted drop   a prompt over `rollout.max_prompt_tokens` (`task.filter_overlong_prompts`; counts
                 logged as `data/overlong_dropped_*`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.config import ConfigError, JsonlTask

PARQUET_BATCH = 4096
"""Rows per parquet batch: a 100k-row file is read in ~25 pieces, never whole."""


class DataError(ConfigError, ValueError):
    """A data file's record is unusable: `<file>: <line N|record N>: <reason>` (exit code 2)."""


def iter_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for every record, streamed: `line N` of a `.jsonl` (blank lines skipped),
    `record N` of a `.parquet` (1-based)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH):
            for row in batch.to_pylist():
                n += 1
                yield f"record {n}", row
        return
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(path, f"line {lineno}", "not UTF-8 text") from None
            if line.strip():
                try:
                    yield f"line {lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(path, f"line {lineno}", f"invalid JSON ({err.msg})") from None


def first_record(path: Path) -> dict[str, Any]:
    """The file's first record (read without loading the rest), for checking columns up front."""
    for where, row in iter_rows(path):
        if not isinstance(row, dict):
            raise DataError(path, where, "a record must be a JSON object")
        return row
    raise DataError(path, "records", "the file has none")


def lookup(row: dict[str, Any], column: str) -> Any:
    """`row[a][b]` for the dotted column `a.b`; KeyError when any part is missing."""
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(column)
        value = value[part]
    return value


def as_messages(value: Any) -> list[dict[str, str]] | None:
    """A chat message list (`[{"role": ..., "content": ...}, ...]`, as verl stores prompts), or None
    for a plain string; ValueError for anything else."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("the prompt is empty")
        return None
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"the prompt must be a string or a list of {{role, content}} messages, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        bad = next((m for m in value if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                                             and isinstance(m.get("content"), str))), None)
        if not value:
            return "an empty list"
        if isinstance(bad, dict):
            return f"a message without a string {'role' if not isinstance(bad.get('role'), str) else 'content'}"
        return f"a list holding {type(bad).__name__}"
    return "null" if value is None else type(value).__name__


def answer_problem(answer: Any, reward: str) -> str | None:
    """Why `answer` cannot be scored by `reward`, or None."""
    if answer is None:
        return "the answer is null (a record without an answer cannot be scored)"
    if reward == "code_io":
        from core.code_rewards import parse_cases

        if parse_cases(answer) is None:
            return ('not runnable cases: expected JSON {"inputs": [...], "outputs": [...]} of equal, non-zero '
                    'length (and an identifier "fn_name" for call cases)')
        return None
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        return f"the answer must be a string or a number, got {type(answer).__name__}"
    if not str(answer).strip():
        return "the answer is empty"
    return None


def record_fields(row: Any, cfg: JsonlTask) -> tuple[Any, str]:
    """(prompt value, answer string) of one record, checked; ValueError says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError("a record must be a JSON object")
    prompt_key, answer_key = cfg.columns
    try:
        prompt, answer = lookup(row, prompt_key), lookup(row, answer_key)
    except KeyError as err:
        raise ValueError(f"no column '{err.args[0]}' (format {cfg.format})") from None
    messages = as_messages(prompt)
    if messages is not None and cfg.chat_template is False:
        raise ValueError("a chat message list, but task.chat_template is false")
    why = answer_problem(answer, cfg.reward)
    if why:
        raise ValueError(f"{answer_key}: {why}")
    if isinstance(answer, str):
        return prompt, answer
    return prompt, json.dumps(answer) if isinstance(answer, (dict, list)) else str(answer)


def check_data(cfg: JsonlTask, files: list[tuple[str, Path]], student: Path | None, max_prompt_tokens: int | None) -> dict[str, int]:
    """Every record of every file, streamed (`DataError` on the first bad one); with the overlong
    filter on, at least one prompt of each file must fit. Returns {config key: records}."""
    from core.task import PromptRenderer

    render = PromptRenderer(cfg, student)
    counts: dict[str, int] = {}
    for key, path in files:
        stamp = (str(path), path.stat().st_mtime_ns, path.stat().st_size, cfg.model_dump_json(), str(student),
                 max_prompt_tokens)
        if stamp in _checked:  # a sweep's trials share files: each is read once per process
            counts[key] = _checked[stamp]
            continue
        n, fits, pending = 0, not (cfg.filter_overlong_prompts and max_prompt_tokens and student), []
        for where, row in iter_rows(path):
            n += 1
            try:
                prompt, _ = record_fields(row, cfg)
                if not fits:
                    pending.append(render(prompt))
            except ValueError as err:
                raise DataError(path, where, str(err)) from None
            if not fits:
                if len(pending) == 64:
                    fits, pending = min(render.lengths(pending)) <= max_prompt_tokens, []
        if n == 0:
            raise DataError(path, "records", f"the file has none ({key})")
        if not fits and not (pending and min(render.lengths(pending)) <= max_prompt_tokens):
            raise DataError(path, "prompts", f"every prompt is longer than rollout.max_prompt_tokens = "
                            f"{max_prompt_tokens} tokens (after the chat template): nothing to train on")
        counts[key] = _checked[stamp] = n
    return counts


_checked: dict[tuple, int] = {}
