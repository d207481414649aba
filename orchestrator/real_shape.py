"""Real-shape models for the CPU harness (`make test-scale`, `benchmarks/memory_model.py --shape real`).

Qwen2.5-0.5B's shapes where they decide the GPU path's costs and failure modes: a 151,936-token
vocabulary with tied embeddings (the logits, the LM head's share of memory, top-k log-probs at 64),
hidden 896, 14 query heads of 64 and 2 KV heads (GQA; a head size vLLM's CPU attention runs),
MLP 4864; fewer layers (default 2), so a CPU runs a few steps in seconds. Random weights from the
project's seeded init (`core.modeling.init_model`'s rule), saved in bf16 as the released
checkpoints are. The tokenizer is word-level over the embedded task's characters plus filler
tokens up to the full vocabulary, so every id the models can emit decodes to text.

    foresight prepare --workload real_shape --out /tmp/real_shape   # student/ and teacher/
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

QWEN25_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_key_value_heads": 2,
              "head_dim": 64, "vocab_size": 151_936, "tie_word_embeddings": True, "max_position_embeddings": 64,
              "rope_theta": 1_000_000.0}
"""Qwen2.5-0.5B-Instruct's config.json values (its context is 32768; 64 positions cover the task here)."""


def build_tokenizer(vocab_size: int = QWEN25_05B["vocab_size"]):
    """The embedded task's character tokenizer, its vocabulary filled up to `vocab_size` ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from core.modeling import CHARS, SPECIALS

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    vocab.update({f"<t{i}>": i for i in range(len(vocab), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   padding_side="left")


def build_model(folder: Path, *, layers: int, seed: int, tokenizer) -> dict:
    """A 0.5B-shaped Qwen2 with `layers` layers: weights N(0, 0.02^2), norms 1, biases 0, drawn from one
    seeded generator in parameter-name order; saved in bf16 with the tokenizer. Returns its record."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from core.modeling import seeded_init_

    cfg = Qwen2Config(**QWEN25_05B, num_hidden_layers=layers, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, use_sliding_window=False)
    model = seeded_init_(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), seed)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    return {"path": str(folder), "params": sum(p.numel() for p in model.parameters()), "layers": layers,
            "seed": seed, "sha256": digest}


def build(out: Path, *, student_layers: int = 2, teacher_layers: int = 2, seed: int = 0) -> dict:
    """student/ and teacher/ under `out` (one tokenizer), and `real_shape.json` with their records."""
    out = Path(out)
    tokenizer = build_tokenizer()
    record = {"shape": QWEN25_05B,
              "student": build_model(out / "student", layers=student_layers, seed=seed * 100 + 2, tokenizer=tokenizer),
              "teacher": build_model(out / "teacher", layers=teacher_layers, seed=seed * 100 + 1, tokenizer=tokenizer)}
    (out / "real_shape.json").write_text(json.dumps(record, indent=2))
    return record
