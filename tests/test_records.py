"""User data checked whole before launch (core/records.py): every bad record is a
`<file>: <line|record N>: <reason>` error with exit code 2, found on the driver, not an actor's
traceback after the cluster started; a missing answer is never trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import foresight, model_overrides
from core.config import ConfigError, JsonlTask
from core.records import DataError, check_data

GOOD = {"prompt": "1+1=", "answer": "2"}
CASES = json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})


def jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def check(path: Path, **task) -> dict[str, int]:
    cfg = JsonlTask(train_path=path, test_path=path, **task)
    return check_data(cfg, [("task.train_path", path)], None, None)


@pytest.mark.parametrize("bad, reward, reason", [
    ("{oops", "exact", "invalid JSON"),
    ([1, 2], "exact", "a record must be a JSON object"),
    ({"prompt": 5, "answer": "1"}, "exact", "the prompt must be a string or a list of {role, content} messages, got int"),
    ({"prompt": [{"role": "user"}], "answer": "1"}, "exact", "got a message without a string content"),
    ({"prompt": [], "answer": "1"}, "exact", "got an empty list"),
    ({"prompt": "  ", "answer": "1"}, "exact", "the prompt is empty"),
    ({"prompt": "q"}, "exact", "no column 'answer' (format plain)"),
    ({"prompt": "q", "answer": None}, "math_verify", "answer: the answer is null"),
    ({"prompt": "q", "answer": ""}, "math_verify", "answer: the answer is empty"),
    ({"prompt": "q", "answer": {"a": 1}}, "exact", "the answer must be a string or a number, got dict"),
    ({"prompt": "q", "answer": '{"inputs": [1], "outputs": []}'}, "code_io", "not runnable cases"),
    ({"prompt": "q", "answer": '{"inputs": [], "outputs": []}'}, "code_io", "not runnable cases"),
    ({"prompt": "q", "answer": "print(1)"}, "code_io", "not runnable cases"),
    ({"prompt": "q", "answer": " "}, "python_tests", "the answer is empty"),
])
def test_a_bad_record_names_file_line_and_reason(tmp_path, bad, reward, reason):
    good = dict(GOOD, answer=CASES) if reward == "code_io" else GOOD
    path = jsonl(tmp_path / "train.jsonl", [good, "", good, bad])  # a blank line is skipped, not counted as a record
    with pytest.raises(DataError) as err:
        check(path, reward=reward)
    assert isinstance(err.value, ConfigError) and str(err.value).startswith(f"{path}: line 4: ")
    assert reason in err.value.reason
    assert check(jsonl(tmp_path / "ok.jsonl", [good, good]), reward=reward) == {"task.train_path": 2}


def test_parquet_records_are_streamed_and_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "reward_model": {"ground_truth": str(i)}}
            for i in range(10_000)]
    rows[9_000]["reward_model"]["ground_truth"] = None
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)
    with pytest.raises(DataError, match=rf"{path}: record 9001: reward_model.ground_truth: the answer is null"):
        check(path, format="verl")


def test_binary_garbage_and_empty_files(tmp_path):
    garbage = tmp_path / "g.jsonl"
    garbage.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match=r"g.jsonl: line 2: not UTF-8 text"):
        check(garbage)
    with pytest.raises(DataError, match=r"e.jsonl: records: the file has none"):
        check(jsonl(tmp_path / "e.jsonl", ["", "  "]))


def test_a_file_whose_every_prompt_is_overlong_is_refused(tmp_path, models):
    path = jsonl(tmp_path / "long.jsonl", [dict(GOOD, prompt="123+456=" * 8)] * 100 + [GOOD])
    cfg = JsonlTask(train_path=path, test_path=path)
    assert check_data(cfg, [("task.train_path", path)], models / "student", 8) == {"task.train_path": 101}  # the last fits
    only_long = jsonl(tmp_path / "only_long.jsonl", [dict(GOOD, prompt="123+456=" * 8)] * 100)
    with pytest.raises(DataError, match="every prompt is longer than rollout.max_prompt_tokens = 8 tokens"):
        check_data(cfg, [("task.train_path", only_long)], models / "student", 8)


def test_cli_refuses_bad_data_before_launch_with_exit_2(tmp_path, fake_models):
    out = tmp_path / "out"
    train = jsonl(tmp_path / "train.jsonl", [GOOD] * 5 + [{"prompt": "q", "answer": None}])
    test = jsonl(tmp_path / "test.jsonl", [GOOD])
    config = tmp_path / "exp.yaml"
    config.write_text(f"run:\n  output_dir: {out}\ntask:\n  type: jsonl\n  reward: exact\n"
                      f"  train_path: {train}\n  test_path: {test}\n")
    proc = foresight("run", str(config), *model_overrides(fake_models), check=False)  # `plan` takes the same checks
    assert proc.returncode == 2, proc.stderr
    assert f"error: {train}: line 6: answer: the answer is null" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
