"""Tasks: fixed splits, rewards, the jsonl/parquet loader with math-verify."""

from __future__ import annotations

import json

import pytest

from orchestrator.config import AdditionTask, JsonlTask
from orchestrator.task import build_addition, build_jsonl, exact_match, math_verify_reward


def test_addition_splits_fixed_disjoint_and_correct():
    a, b = build_addition(AdditionTask()), build_addition(AdditionTask())
    assert a.train == b.train and a.test == b.test
    assert not {e.prompt for e in a.train} & {e.prompt for e in a.test}
    ex = a.test[0]
    x, y = ex.prompt[:-1].split("+")
    assert ex.answer == f"{int(x) + int(y):04d}" and len(ex.prompt) == 8
    assert exact_match(ex.answer, ex.answer) == 1.0 and exact_match("0000", ex.answer) == (ex.answer == "0000")


def test_validation_set_depends_on_seed_only():
    t = build_addition(AdditionTask())
    assert t.validation_set(50, 0) == t.validation_set(50, 0)
    assert t.validation_set(50, 0) != t.validation_set(50, 1)
    assert len(t.validation_set(50, 0)) == 50


def test_math_verify_reward():
    assert math_verify_reward("\\boxed{1/2}", "0.5") == 1.0
    assert math_verify_reward("the answer is 3", "4") == 0.0


def test_jsonl_and_parquet_loader(tmp_path):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2*3=", "answer": "6"}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    task = build_jsonl(JsonlTask(train_path=tmp_path / "train.jsonl", test_path=tmp_path / "test.parquet"))
    assert [e.answer for e in task.train] == ["2", "6"] and task.test == task.train
    assert task.reward("6", "6") == 1.0
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{oops')
    with pytest.raises(ValueError, match="bad.jsonl: line 2: invalid JSON"):
        build_jsonl(JsonlTask(train_path=tmp_path / "bad.jsonl", test_path=tmp_path / "test.parquet"))


def test_code_io_reward_runs_eurus_style_cases():
    """Eurus-2-RL-Data's code rows keep APPS-style cases as a JSON string: stdin -> stdout (compared
    token by token) or, with fn_name, calls; a wrong program, a crash, a hang and malformed cases
    all score 0."""
    import json

    from orchestrator.task import code_io_reward

    stdio = json.dumps({"inputs": ["1 2\n", "10 -3\n"], "outputs": ["3\n", "7"]})
    right = "Reading both numbers:\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert code_io_reward(right, stdio) == 1.0
    assert code_io_reward(right.replace("a + b", "a - b"), stdio) == 0.0
    assert code_io_reward("```python\nraise SystemExit(3)\n```", stdio) == 0.0
    assert code_io_reward("while True: pass", stdio, timeout=1.0) == 0.0
    assert code_io_reward(right, "not json") == 0.0 and code_io_reward(right, '{"inputs": [1], "outputs": []}') == 0.0
    calls = json.dumps({"fn_name": "add", "inputs": [[1, 2], [5, 5]], "outputs": [3, 10]})
    assert code_io_reward("```python\ndef add(a, b):\n    return a + b\n```", calls) == 1.0
    assert code_io_reward("```python\nclass Solution:\n    def add(self, a, b):\n        return a + b\n```", calls) == 1.0
    assert code_io_reward("```python\ndef add(a, b):\n    return a * b\n```", calls) == 0.0


def test_python_tests_reward_runs_the_tests_in_a_subprocess():
    from orchestrator.task import python_tests_reward

    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0"
    assert python_tests_reward("Here you go:\n```python\ndef add(a, b):\n    return a + b\n```", tests) == 1.0
    assert python_tests_reward("```python\ndef add(a, b):\n    return a - b\n```", tests) == 0.0
    assert python_tests_reward("while True: pass", "", timeout=1.0) == 0.0


@pytest.mark.parametrize("gold, right, wrong", [
    ("2\\sqrt{3}", "The answer is \\boxed{2\\sqrt{3}}", "\\boxed{2}"),        # bare parse of the gold gives 2
    ("\\frac{\\pi}{4}", "\\boxed{\\frac{\\pi}{4}}", "\\boxed{\\frac{\\pi}{3}}"),  # bare parse of the gold gives nothing
    ("\\frac{1}{2}", "so x = \\boxed{0.5}", "\\boxed{\\frac{1}{3}}"),
    ("\\sqrt{2}", "\\boxed{\\sqrt{2}}", "\\boxed{2}"),
    ("(1, 3]", "\\boxed{(1,3]}", "\\boxed{[1,3]}"),                            # intervals
    ("\\{1, 2, 3\\}", "\\boxed{\\{3,2,1\\}}", "\\boxed{\\{1,2\\}}"),           # sets
    ("25\\%", "\\boxed{25\\%}", "\\boxed{2.5\\%}"),                            # percentages
    ("-7", "\\boxed{-7}", "\\boxed{7}"),                                      # negative numbers
    ("5\\text{ cm}", "\\boxed{5 \\text{ cm}}", "\\boxed{6\\text{ cm}}"),       # units
    ("12", "first \\boxed{7}, then correcting: \\boxed{12}", "\\boxed{12} no wait \\boxed{13}"),  # the last box counts
])
def test_math_verify_reward_in_both_directions(gold, right, wrong):
    from orchestrator.task import math_verify_reward

    assert math_verify_reward(right, gold) == 1.0
    assert math_verify_reward(wrong, gold) == 0.0


def test_last_boxed_matches_nested_braces():
    from orchestrator.task import last_boxed

    assert last_boxed("x \\boxed{\\frac{1}{2}} and \\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed{\\frac{a}{b}") is None and last_boxed("no box") is None
