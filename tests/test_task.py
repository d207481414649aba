"""Tasks: fixed splits, rewards, the jsonl/parquet loader with math-verify."""

from __future__ import annotations

import json

import pytest

from core.config import AdditionTask, JsonlTask
from core.task import build_addition, build_jsonl, exact_match, math_verify_reward


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
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "answer": "1"}\n{oops')
    with pytest.raises(ValueError, match="bad.jsonl: line 2: invalid JSON"):
        build_jsonl(JsonlTask(train_path=tmp_path / "bad.jsonl", test_path=tmp_path / "test.parquet"))


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
    from core.task import math_verify_reward

    assert math_verify_reward(right, gold) == 1.0
    assert math_verify_reward(wrong, gold) == 0.0


def test_last_boxed_matches_nested_braces():
    from core.task import last_boxed

    assert last_boxed("x \\boxed{\\frac{1}{2}} and \\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\boxed{\\frac{a}{b}") is None and last_boxed("no box") is None
