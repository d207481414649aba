"""Models, tokenizer and the batched sequence math every role shares.

Sequence layout of a rollout batch (B sequences, prompt width P, response width R)::

    input_ids_BL = [ left-padded prompt (P) | response, right-padded after EOS (R) ],  L = P + R

The log-probability of response token j comes from the logits at position P + j - 1.
Position ids are `cumsum(attention_mask) - 1`, so left padding does not shift positions
(the same rule HF `generate` uses).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SPECIALS = ["<pad>", "<unk>", "<eos>"]
CHARS = list("0123456789+-*/=().,^ ") + list("abcdefghijklmnopqrstuvwxyz") + ["\\", "{", "}"]


def quiet_hf() -> None:
    """No network, no telemetry, no noisy warnings; called at the start of every process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers.utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # transformers' assisted-generation module imports scikit-learn (and scipy) at import when it is
    # installed (mlflow pulls it in): ~1.5 s of every actor's start, for a feature no role uses; its
    # object-detection losses import scipy.optimize the same way (~0.5 s; scipy's only use there).
    transformers.utils.is_sklearn_available = lambda: False
    transformers.utils.is_scipy_available = lambda: False


def build_tokenizer():
    """A character-level tokenizer built locally with `tokenizers` (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>", padding_side="left"
    )


@dataclass(frozen=True)
class TinyArch:
    """A Llama-architecture model small enough to train on a laptop CPU."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int = 64

    def hf_config(self, vocab_size: int, pad_id: int, eos_id: int, family: str = "llama"):
        """The HF config of this size in the `llama` or `qwen2` architecture (Qwen2: biased q/k/v)."""
        from transformers import LlamaConfig, Qwen2Config

        common = dict(
            vocab_size=vocab_size, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.heads,
            max_position_embeddings=self.max_positions, tie_word_embeddings=False,
            pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id, torch_dtype="float32",
        )
        if family == "qwen2":
            return Qwen2Config(**common, use_sliding_window=False)
        return LlamaConfig(**common)


def init_model(arch: TinyArch, tokenizer, seed: int, family: str = "llama"):
    """Random-init a causal LM from `arch`: every weight matrix and embedding N(0, 0.02^2), every norm
    weight 1, every bias 0, drawn from one seeded generator in parameter-name order, so the initial weights do not
    depend on the transformers version's own init code."""
    from transformers import AutoModelForCausalLM

    cfg = arch.hf_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, family)
    return seeded_init_(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), seed)


def seeded_init_(model, seed: int):
    """In place: every weight matrix and embedding N(0, 0.02^2), every norm weight 1, every bias 0, from
    one generator seeded with `seed`, in parameter-name order. Returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0) if "norm" in name else p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Load a local HF checkpoint (fp32 on the CPU unless told), eval mode. Never touches the network.
    `device="balanced"`: layers split over every visible GPU (accelerate's device map)."""
    quiet_hf()
    from transformers import AutoModelForCausalLM

    if device == "balanced":
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                    device_map="balanced").eval()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def load_tokenizer(path: str | Path):
    quiet_hf()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.padding_side = "left"
    return tok


# ----------------------------------------------------------------------------- batch math
def position_ids(mask_BL: torch.Tensor) -> torch.Tensor:
    return (mask_BL.long().cumsum(-1) - 1).clamp_min(0)


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask, [B, P]."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def response_mask(response_BR: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1.0 for response tokens up to and including the first EOS, 0.0 after."""
    is_eos = (response_BR == eos_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).float()


def response_logits(model, input_ids_BL: torch.Tensor, mask_BL: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits that predict each response token: [B, R, V]."""
    out = model(input_ids=input_ids_BL, attention_mask=mask_BL, position_ids=position_ids(mask_BL), use_cache=False)
    return out.logits[:, prompt_len - 1 : -1].float()


def gather_logp(logp_BRV: torch.Tensor, tokens_BR: torch.Tensor) -> torch.Tensor:
    return logp_BRV.gather(-1, tokens_BR.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def score_responses(model, batch: dict, *, topk: int | None = None, full: bool = False, max_tokens: int = 22000,
                    chunk_tokens: int = 2048) -> dict[str, torch.Tensor]:
    """log p(y_t | x, y_<t) of every response token of a rollout batch, [B, R] (0 where masked), on
    the model's device and in its dtype, returned as fp32 on the CPU: "logp"; with `topk` also the
    k most likely tokens per position ("topk_ids", "topk_logp" [B, R, k]); with `full` the whole
    log-distribution "logp_full" [B, R, V] (small vocabularies only).

    Rows go through the model in micro-batches of at most `max_tokens` tokens, each cut to its own
    width (no computation on padding columns no row of it uses), and the LM head runs on
    `chunk_tokens` positions at a time: no [B, L, V] tensor, at a 152k vocabulary ~0.6 MB per
    position in fp32."""
    dev = model_device(model)
    P, mask_BR = batch["prompt_len"], batch["response_mask"]
    B, R = mask_BR.shape
    prompt_len = batch["attention_mask"][:, :P].sum(1)
    resp_len = mask_BR.sum(1).long()
    out = {"logp": torch.zeros(B, R)}
    if topk:
        k = min(topk, model.config.vocab_size)
        out["topk_ids"], out["topk_logp"] = torch.zeros(B, R, k, dtype=torch.long), torch.full((B, R, k), -1e4)
    if full:
        out["logp_full"] = torch.zeros(B, R, model.config.vocab_size)
    width = int(prompt_len.max()) + max(1, int(resp_len.max()))
    per = max(1, max_tokens // max(width, 1))
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    for a in range(0, B, per):
        b = min(a + per, B)
        p0 = int(P - prompt_len[a:b].max())
        r1 = max(1, int(resp_len[a:b].max()))
        ids = batch["input_ids"][a:b, p0 : P + r1].to(dev)
        att = batch["attention_mask"][a:b, p0 : P + r1].to(dev)
        hidden = decoder(input_ids=ids, attention_mask=att, position_ids=position_ids(att), use_cache=False).last_hidden_state
        hidden = hidden[:, P - p0 - 1 : -1]
        y = batch["response"][a:b, :r1].to(dev)
        step = max(1, chunk_tokens // (b - a))
        for j0 in range(0, r1, step):
            j1 = min(j0 + step, r1)
            logp = torch.log_softmax(head(hidden[:, j0:j1]).float(), dim=-1)
            out["logp"][a:b, j0:j1] = gather_logp(logp, y[:, j0:j1]).cpu()
            if topk:
                vals, idx = logp.topk(k, dim=-1)
                out["topk_logp"][a:b, j0:j1], out["topk_ids"][a:b, j0:j1] = vals.cpu(), idx.cpu()
            if full:
                out["logp_full"][a:b, j0:j1] = logp.cpu()
    out["logp"] *= mask_BR
    return out


def decode_responses(tokenizer, response_BR: torch.Tensor, mask_BR: torch.Tensor) -> list[str]:
    """Text of each response before its EOS."""
    out = []
    eos = tokenizer.eos_token_id
    for row, m in zip(response_BR.tolist(), mask_BR.tolist()):
        ids = [t for t, keep in zip(row, m) if keep and t != eos]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, *, greedy: bool,
             temperature: float = 1.0, seed: int | None = None) -> dict[str, torch.Tensor | list[str] | int]:
    """Sample (or greedy-decode) completions with HF `generate`.

    Returns input_ids [B, L], attention_mask [B, L], prompt_len P, response [B, R],
    response_mask [B, R] and, when sampling, `logp` [B, R]: log pi(y_t) of each sampled token
    under the sampling distribution softmax(logits / temperature) (no top-k / top-p).
    """
    ids_BP, pmask_BP = encode_prompts(tokenizer, prompts)
    dev = model_device(model)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids_BP.to(dev), attention_mask=pmask_BP.to(dev), max_new_tokens=max_new_tokens,
        do_sample=not greedy, temperature=temperature if not greedy else None, top_k=0 if not greedy else None,
        top_p=1.0 if not greedy else None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True, output_logits=not greedy,
    )
    P = ids_BP.shape[1]
    sequences = out.sequences.cpu()
    response_BR = sequences[:, P:]
    rmask_BR = response_mask(response_BR, tokenizer.eos_token_id)
    result: dict = {
        "input_ids": sequences,
        "attention_mask": torch.cat([pmask_BP, rmask_BR.long()], dim=1),
        "prompt_len": P,
        "response": response_BR,
        "response_mask": rmask_BR,
    }
    if not greedy:  # one [B, V] step at a time: no [B, R, V] tensor
        ids = out.sequences[:, P:]
        logp_BR = torch.stack([gather_logp(torch.log_softmax(lg.float() / temperature, -1), ids[:, t])
                               for t, lg in enumerate(out.logits)], dim=1)
        result["logp"] = logp_BR.cpu() * rmask_BR
    return result


@torch.no_grad()
def greedy_accuracy(model, tokenizer, examples, rewards, max_new_tokens: int, batch_size: int = 512) -> float:
    """Mean reward of greedy completions over `examples` (the papers' accuracy); `rewards(completions,
    answers)` is the task's batch reward (`Task.rewards`)."""
    total = 0.0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        out = generate(model, tokenizer, [e.prompt for e in chunk], max_new_tokens, greedy=True)
        texts = decode_responses(tokenizer, out["response"], out["response_mask"])
        total += sum(rewards(texts, [e.answer for e in chunk]))
    return total / max(len(examples), 1)


def slice_batch(batch: dict, lo: int, hi: int) -> dict:
    """Rows lo:hi of every [B, ...] tensor/list in a rollout batch."""
    return {k: (v[lo:hi] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}


def concat_batches(parts: list[dict]) -> dict:
    """Inverse of slice_batch for parts of different widths: rows are stacked; response-aligned
    tensors ([B, R] and [B, R, V]: responses, masks, log-probs, teacher distributions) are
    right-padded to the widest part's R with zeros (masked); `input_ids` / `attention_mask` are
    re-laid out as [left-padded prompt (P) | right-padded response (R)]. Works for rollout parts
    (which carry `prompt_len`) and teacher parts (which do not)."""
    if len(parts) == 1:
        return parts[0]
    R = max(_width(p) for p in parts)
    out: dict = {}
    if "prompt_len" in parts[0]:
        out["prompt_len"] = P = max(p["prompt_len"] for p in parts)
    for key in parts[0]:
        if key == "prompt_len":
            continue
        vals = []
        for p in parts:
            v = p[key]
            if isinstance(v, torch.Tensor):
                if key in ("input_ids", "attention_mask"):
                    v = F.pad(v, (P - p["prompt_len"], R - v.shape[1] + p["prompt_len"]), value=0)
                elif v.dim() >= 2:
                    pad = [0, 0] * (v.dim() - 2) + [0, R - v.shape[1]]
                    v = F.pad(v, pad, value=0)
            vals.append(v)
        out[key] = sum(vals, []) if isinstance(vals[0], list) else torch.cat(vals)
    return out


def _width(part: dict) -> int:
    """Response width R of a rollout or teacher part."""
    for key in ("response", "logp", "logp_full"):
        if key in part:
            return part[key].shape[1]
    raise KeyError("a batch part needs `response` or `logp`")
