"""The paper's math workload at CPU size ("math twin"): the data, tokenizer and chat format that
`foresight prepare --workload math_twin` builds, so the paper's code path (verl parquet, chat
template with `enable_thinking=False`, math-verify rewards, Qwen2 models) runs on a laptop.

Problems (seeded, fixed splits):
- `What is 123+456? Put the final answer in \\boxed{}.` -> gold `579` (3-digit addition, 70%);
- `What is 5/12+9/12? Put the final answer in \\boxed{}.` -> gold `\\frac{7}{6}` (same-denominator
  fractions, reduced; 30%).

The SFT solution is `\\boxed{579}` / `\\boxed{\\frac{14}{12}}`: the fraction is *not* reduced, so
exact match against the gold would call a right answer wrong and only math-verify (which compares
values) scores it. Files are written in verl's RL layout (`prompt` a chat message list,
`reward_model.ground_truth`, `data_source`, `extra_info`).

The tokenizer is a byte-level BPE (digits split one per token, as Qwen2's pre-tokenizer does)
trained on the rendered training conversations, with `<|endoftext|>` (pad), `<|im_start|>`,
`<|im_end|>` (EOS) and a Qwen3-style chat template: the generation prompt appends an empty
`<think>\\n\\n</think>\\n\\n` block when `enable_thinking=False`.
"""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

from core.task import Example

INSTRUCTION = "Put the final answer in \\boxed{}."
DATA_SOURCE = "foresight/math_twin"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
TEMPLATE_KWARGS = {"enable_thinking": False}
TWIN_SEED = 4321


def latex(value: Fraction) -> str:
    """`7`, `-3` or `\\frac{7}{6}` (reduced)."""
    return str(value.numerator) if value.denominator == 1 else f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def problem(rng: random.Random) -> tuple[str, str, str]:
    """(question, gold answer, SFT solution) of one random problem."""
    if rng.random() < 0.7:
        a, b = rng.randrange(1000), rng.randrange(1000)
        return f"What is {a}+{b}? {INSTRUCTION}", str(a + b), f"\\boxed{{{a + b}}}"
    d = rng.randrange(2, 13)
    a, b = rng.randrange(1, 2 * d), rng.randrange(1, 2 * d)
    return (f"What is {a}/{d}+{b}/{d}? {INSTRUCTION}", latex(Fraction(a + b, d)),
            f"\\boxed{{\\frac{{{a + b}}}{{{d}}}}}")


def problems(train_size: int, test_size: int) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """Disjoint train/test splits (no question in both), drawn with a fixed seed."""
    rng, seen, out = random.Random(TWIN_SEED), set(), []
    while len(out) < train_size + test_size:
        p = problem(rng)
        if p[0] not in seen:
            seen.add(p[0])
            out.append(p)
    return out[test_size:], out[:test_size]


def verl_row(question: str, gold: str, split: str, index: int) -> dict:
    """One record in verl's RL parquet layout."""
    return {"data_source": DATA_SOURCE, "prompt": [{"role": "user", "content": question}], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": gold}, "extra_info": {"split": split, "index": index}}


def write_verl(path: Path, rows: list[tuple[str, str, str]], split: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([verl_row(q, g, split, i) for i, (q, g, _) in enumerate(rows)])
    pq.write_table(table, path, compression="zstd")


def render(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True, **TEMPLATE_KWARGS)


def build_tokenizer(corpus: list[str], vocab_size: int = 384):
    """Byte-level BPE trained on `corpus` (deterministic: one thread, fixed corpus order)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(corpus, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build(out_dir: Path, train_size: int, test_size: int):
    """Write the verl files under `out_dir/data/` and return (tokenizer, SFT task): the SFT task's
    train examples are (rendered prompt, solution), its test examples (rendered prompt, gold), scored
    with math-verify."""
    from core.task import Task, math_verify_reward

    train, test = problems(train_size, test_size)
    write_verl(out_dir / "data" / "train.parquet", train, "train")
    write_verl(out_dir / "data" / "test.parquet", test, "test")
    # the text between the special tokens of each training conversation (specials are never merged)
    corpus = [piece for q, _, s in train for piece in (f"user\n{q}", "\n", f"assistant\n<think>\n\n</think>\n\n{s}")]
    tokenizer = build_tokenizer(corpus)
    sft = Task(train=[Example(render(tokenizer, q), s) for q, _, s in train],
               test=[Example(render(tokenizer, q), g) for q, g, _ in test], reward=math_verify_reward)
    return tokenizer, sft
