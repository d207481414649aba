"""Data as users bring it (issue 14): verl parquet with chat-message prompts and nested
`reward_model.ground_truth`, DeepMath-103K's own columns, plain prompt/answer files; chat templates
(with extra template variables such as Qwen3's `enable_thinking`); the overlong-prompt filter; and
wrong column names rejected before anything launches, naming the file and the column. Files are
written here in code; the tokenizer is the shipped student's with a chat template added."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT
from core.config import ConfigError, JsonlTask, check_paths, load_config
from core.task import build_task

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)
"""A Qwen3-like template: the generation prompt carries an empty think block when thinking is off."""
MODELS = ROOT / "models" / "addition"


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    """The shipped student's tokenizer with a chat template (config.json copied so it is a checkpoint folder)."""
    from core.modeling import load_tokenizer

    out = tmp_path_factory.mktemp("tok")
    tok = load_tokenizer(MODELS / "student")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(out)
    (out / "config.json").write_text((MODELS / "student" / "config.json").read_text())
    return out


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def verl_row(question: str, answer: str, i: int) -> dict:
    """One record as verl's math preprocessing writes it (DeepMath-103K in the EffOPD paper)."""
    return {"data_source": "deepmath", "prompt": [{"role": "user", "content": question}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer}, "extra_info": {"index": i, "split": "train"}}


def test_verl_parquet_prompts_go_through_the_chat_template(tmp_path, student):
    rows = [verl_row("What is 123+456? Put the final answer in \\boxed{}.", "579", 0),
            verl_row("Simplify 6/8.", "\\frac{3}{4}", 1)]
    train, test = write(tmp_path / "train.parquet", rows), write(tmp_path / "test.parquet", rows[:1])
    cfg = JsonlTask(train_path=train, test_path=test, format="verl", chat_template_kwargs={"enable_thinking": False})
    task = build_task(cfg, student)
    assert task.train[0].prompt == ("<|user|>What is 123+456? Put the final answer in \\boxed{}.\n"
                                    "<|assistant|><think></think>")
    assert [e.answer for e in task.train] == ["579", "\\frac{3}{4}"] and len(task.test) == 1
    assert task.reward("so \\boxed{\\frac{6}{8}}", task.train[1].answer) == 1.0  # verified, not string-matched
    thinking = build_task(cfg.model_copy(update={"chat_template_kwargs": {}}), student)
    assert thinking.train[0].prompt.endswith("<|assistant|>")


def test_deepmath_columns_and_plain_prompts(tmp_path, student):
    rows = [{"question": "Compute 2+2.", "final_answer": "4", "difficulty": 1.0, "r1_solution_1": "..."}]
    path = write(tmp_path / "dm.jsonl", rows)
    plain = build_task(JsonlTask(train_path=path, test_path=path, format="deepmath"), student)
    assert plain.train[0].prompt == "Compute 2+2." and plain.train[0].answer == "4"  # strings stay as they are
    templated = build_task(JsonlTask(train_path=path, test_path=path, format="deepmath", chat_template=True), student)
    assert templated.train[0].prompt == "<|user|>Compute 2+2.\n<|assistant|>"
    nested = build_task(JsonlTask(train_path=path, test_path=path, prompt_key="question", answer_key="final_answer"))
    assert nested.train == plain.train  # explicit columns, no tokenizer needed for plain strings


def test_message_lists_need_a_template_and_are_refused_when_templates_are_off(tmp_path, student):
    path = write(tmp_path / "v.parquet", [verl_row("Q?", "1", 0)])
    with pytest.raises(ValueError, match="record 1: a chat message list, but task.chat_template is false"):
        build_task(JsonlTask(train_path=path, test_path=path, format="verl", chat_template=False), student)
    with pytest.raises(ValueError, match="v.parquet: record 1: the prompt needs a chat template and the student's tokenizer"):
        build_task(JsonlTask(train_path=path, test_path=path, format="verl"), MODELS / "student")
    bad = write(tmp_path / "bad.jsonl", [{"prompt": [{"role": "user"}], "answer": "1"}])
    with pytest.raises(ValueError, match="bad.jsonl: line 1: the prompt must be a string or a list of .* got a message without a string content"):
        build_task(JsonlTask(train_path=bad, test_path=bad), student)


def test_overlong_prompts_are_dropped_and_counted(tmp_path, student):
    rows = [verl_row("1+1", "2", 0), verl_row("1+1" * 40, "2", 1), verl_row("2+2", "4", 2)]
    path = write(tmp_path / "t.parquet", rows)
    cfg = JsonlTask(train_path=path, test_path=path, format="verl")
    full = build_task(cfg, student)
    from core.modeling import load_tokenizer

    lengths = [len(load_tokenizer(student)(e.prompt, add_special_tokens=False)["input_ids"]) for e in full.train]
    limit = sorted(lengths)[1]  # the two short prompts fit, the long one does not
    task = build_task(cfg, student, max_prompt_tokens=limit)
    assert [e.answer for e in task.train] == ["2", "4"] and task.dropped == {"train": 1, "test": 1}
    assert build_task(cfg.model_copy(update={"filter_overlong_prompts": False}), student, limit).dropped is None
    with pytest.raises(ValueError, match="every prompt is longer than rollout.max_prompt_tokens = 1"):
        build_task(cfg, student, max_prompt_tokens=1)


def test_wrong_column_is_a_config_error_naming_file_and_column(tmp_path, monkeypatch, student):
    path = write(tmp_path / "train.parquet", [verl_row("Q?", "1", 0)])
    overrides = [f"models.student={student}", f"models.teacher={MODELS / 'teacher'}", "task.type=jsonl",
                 f"task.train_path={path}", f"task.test_path={path}", "task.format=verl"]
    check_paths(load_config(None, overrides), "x.yaml")  # the verl layout's columns are there
    with pytest.raises(ConfigError) as err:
        check_paths(load_config(None, overrides + ["task.answer_key=reward_model.answer"]), "x.yaml")
    assert err.value.key == "task.answer_key" and str(path) in err.value.reason
    assert "no column 'reward_model.answer'" in err.value.reason and "reward_model" in err.value.reason
    with pytest.raises(ConfigError, match="task.prompt_key: .*no column 'question'"):
        check_paths(load_config(None, overrides[:-1] + ["task.format=deepmath"]), "x.yaml")
    monkeypatch.setenv("FORESIGHT_DATA_ROOT", str(tmp_path))
    cfg = load_config(None, overrides[:3] + ["task.train_path=$FORESIGHT_DATA_ROOT/train.parquet",
                                             f"task.test_path={path}", "task.format=verl"])
    assert cfg.task.train_path == path
    monkeypatch.delenv("FORESIGHT_DATA_ROOT")
    with pytest.raises(ConfigError, match=r"no such file: \$FORESIGHT_DATA_ROOT/train.parquet \(is \$FORESIGHT_DATA_ROOT set\?\)"):
        check_paths(load_config(None, overrides[:3] + ["task.train_path=$FORESIGHT_DATA_ROOT/train.parquet",
                                                       f"task.test_path={path}", "task.format=verl"]), "x.yaml")


def test_epochs_visit_every_prompt_once_per_epoch_in_seeded_order():
    """`run.data_order: epochs`: 10 prompts, batches of 4: steps 1-2 and the first half of step 3 are
    epoch 0 (each prompt once), step 3 crosses into epoch 1's own shuffle; the order is a function of
    (seed, step) alone, so a resumed run draws what an uninterrupted one would."""
    from core.data_order import batch_indices, epoch_permutation

    steps = [batch_indices(t, 10, 4, seed=3, order="epochs") for t in range(1, 6)]
    flat = [i for b in steps for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] == epoch_permutation(10, 3, 0) and flat[10:20] == epoch_permutation(10, 3, 1)
    assert flat[:10] != flat[10:20]  # each epoch reshuffles
    epoch_permutation.cache_clear()
    assert batch_indices(3, 10, 4, seed=3, order="epochs") == steps[2]  # fresh process, same position
    assert batch_indices(1, 10, 4, seed=4, order="epochs") != steps[0]
    import random

    assert batch_indices(7, 100, 8, seed=1) == random.Random(1 * 1_000_003 + 7).sample(range(100), 8)  # default unchanged
