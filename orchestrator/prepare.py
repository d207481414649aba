"""`foresight prepare`: build the embedded teacher and student with supervised training.

Both are HF-format Llama models built from a config (safetensors + a locally built tokenizer).
SFT minimises the answer tokens' cross-entropy on the training split:
    L = -mean_{answer tokens} log p(y_t | x, y_<t).
The teacher trains until its greedy accuracy on the first `stop_examples` test prompts reaches
`teacher_target`; the student (a smaller model) stops on the first evaluation inside the accuracy
band [lo, hi]. Reported accuracies are on the whole test split.

Reproducible: seeded, single-threaded, and the initial weights come from the project's own seeded
init (`core.modeling.init_model`), not from the transformers version's init code; the
record (`prepare.json`) holds each model's sha256, and `make demo`/the tests use the models shipped
in `models/addition/` (a rebuild with `--force` reproduces them bit for bit on this machine kind).
`--recipe quick` trains a few steps only, to check determinism cheaply.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.config import AdditionTask
from core.modeling import TinyArch, build_tokenizer, greedy_accuracy, init_model, quiet_hf
from core.task import Example, Task, build_addition

log = logging.getLogger(__name__)

# head_dim 32: the smallest head size vLLM's CPU attention backend supports (rollout.backend=vllm)
TEACHER_ARCH = TinyArch(hidden=96, layers=3, heads=3, intermediate=384)
STUDENT_ARCH = TinyArch(hidden=64, layers=2, heads=2, intermediate=192)
RECIPE_VERSION = 2


@dataclass(frozen=True)
class Recipe:
    teacher_target: float = 0.97
    student_band: tuple[float, float] = (0.30, 0.60)
    batch_size: int = 128
    teacher_lr: float = 1e-3
    student_lr: float = 1e-3
    eval_every: int = 25
    stop_examples: int = 200
    """Test prompts the stopping rule looks at (the first ones; the whole split is reported)."""
    max_steps: int = 6000
    seed: int = 0
    version: int = RECIPE_VERSION


RECIPES = {
    "default": Recipe(),
    "quick": Recipe(teacher_target=0.0, student_band=(0.0, 1.0), eval_every=10, stop_examples=20),
}
"""`quick`: ten SFT steps per model, for determinism checks."""


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def sft_batch(tokenizer, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, L], attention mask [B, L], labels [B, L] (-100 outside the answer+EOS tokens)."""
    prompts = [tokenizer.encode(e.prompt, add_special_tokens=False) for e in examples]
    answers = [tokenizer.encode(e.answer, add_special_tokens=False) + [tokenizer.eos_token_id] for e in examples]
    L = max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(examples), L), tokenizer.pad_token_id)
    mask = torch.zeros((len(examples), L), dtype=torch.long)
    labels = torch.full((len(examples), L), -100)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(a)
    return ids, mask, labels


def train_sft(model, tokenizer, task: Task, *, lr: float, recipe: Recipe, max_new_tokens: int,
              stop, label: str, on_eval=None) -> tuple[int, float]:
    """AdamW SFT until `stop(acc)` is true at an evaluation; returns (steps, accuracy)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    rng = random.Random(recipe.seed)
    acc, t0 = 0.0, time.time()
    for step in range(1, recipe.max_steps + 1):
        model.train()
        ids, mask, labels = sft_batch(tokenizer, rng.sample(task.train, recipe.batch_size))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        warmup.step()
        if step % recipe.eval_every == 0:
            model.eval()
            acc = greedy_accuracy(model, tokenizer, task.test[: recipe.stop_examples], task.rewards, max_new_tokens)
            log.info("%s step %d loss %.3f test acc %.3f (%.0fs)", label, step, loss.item(), acc, time.time() - t0)
            if on_eval:
                on_eval(step, acc)
            if stop(acc):
                return step, acc
    raise RuntimeError(f"{label}: did not reach its accuracy target in {recipe.max_steps} steps (last {acc:.3f})")


@dataclass(frozen=True)
class Workload:
    """What `prepare` builds: the task, tokenizer and model sizes of one embedded workload."""

    name: str
    teacher_arch: TinyArch
    student_arch: TinyArch
    family: str
    """HF architecture of both models: `llama` or `qwen2`."""
    max_new_tokens: int
    data_files: tuple[str, ...] = ()
    """Files the workload writes under the output folder (checksummed in the record)."""

    def record(self, recipe: Recipe, task_cfg: AdditionTask) -> dict:
        """The part of `prepare.json` that decides whether the models are up to date."""
        want = {"recipe": asdict(recipe), "teacher_arch": asdict(self.teacher_arch), "student_arch": asdict(self.student_arch)}
        if self.name == "addition":  # the record shipped before workloads existed, unchanged
            return {**want, "task": task_cfg.model_dump()}
        return {**want, "workload": self.name, "family": self.family,
                "task": {"train_size": task_cfg.train_size, "test_size": task_cfg.test_size}}

    def build(self, out_dir: Path, task_cfg: AdditionTask):
        """(tokenizer, SFT task): train examples hold the SFT targets, test examples the gold answers."""
        if self.name == "addition":
            return build_tokenizer(), build_addition(task_cfg)
        from orchestrator import twin

        return twin.build(out_dir, task_cfg.train_size, task_cfg.test_size)


WORKLOADS = {
    "addition": Workload("addition", TEACHER_ARCH, STUDENT_ARCH, "llama", max_new_tokens=AdditionTask().digits + 2),
    "math_twin": Workload("math_twin", TinyArch(hidden=96, layers=3, heads=3, intermediate=384),
                          TinyArch(hidden=64, layers=2, heads=2, intermediate=192), "qwen2", max_new_tokens=12,
                          data_files=("data/train.parquet", "data/test.parquet")),
}
"""`addition`: `ABC+DEF=` -> `SSSS`, character tokenizer, Llama (models/addition). `math_twin`: the
paper's workload at CPU size (orchestrator/twin.py): verl parquet, byte-level BPE + chat template,
math-verify, Qwen2 (models/math_twin)."""


def up_to_date(out_dir: Path, want: dict, workload: Workload) -> bool:
    """The record matches `want` and every model and data file hashes to its recorded sha256."""
    meta_path = out_dir / "prepare.json"
    if not meta_path.is_file():
        return False
    have = json.loads(meta_path.read_text())
    files = {f"{r}/model.safetensors": have.get(r, {}).get("sha256") for r in ("teacher", "student")}
    files.update({f: have.get("files", {}).get(f) for f in workload.data_files})
    intact = all((out_dir / f).is_file() and sha256(out_dir / f) == digest for f, digest in files.items())
    if not intact:
        log.warning("models in %s do not match their record (prepare.json): rebuilding", out_dir)
    return intact and {k: have.get(k) for k in want} == json.loads(json.dumps(want))


def prepare(out_dir: Path, recipe: Recipe = Recipe(), force: bool = False, task_cfg: AdditionTask = AdditionTask(),
            workload: str = "addition") -> dict:
    """Build teacher and student under `out_dir/{teacher,student}`; cached by recipe + arch."""
    quiet_hf()
    torch.set_num_threads(1)
    wl = WORKLOADS[workload]
    want = wl.record(recipe, task_cfg)
    if not force and up_to_date(out_dir, want, wl):
        log.info("models in %s are up to date (use --force to rebuild)", out_dir)
        return json.loads((out_dir / "prepare.json").read_text())
    tokenizer, task = wl.build(out_dir, task_cfg)
    result = dict(want)
    if wl.data_files:
        result["files"] = {f: sha256(out_dir / f) for f in wl.data_files}
    for role, arch, lr, seed_off in (("teacher", wl.teacher_arch, recipe.teacher_lr, 1), ("student", wl.student_arch, recipe.student_lr, 2)):
        model = init_model(arch, tokenizer, recipe.seed * 100 + seed_off, wl.family)
        torch.manual_seed(recipe.seed * 100 + seed_off)  # dropout-free models: only for completeness
        if role == "teacher":
            stop = lambda a: a >= recipe.teacher_target  # noqa: E731
        else:
            lo, hi = recipe.student_band
            stop = lambda a: lo <= a <= hi  # noqa: E731
        t0 = time.time()
        steps, acc = train_sft(model, tokenizer, task, lr=lr, recipe=recipe, max_new_tokens=wl.max_new_tokens,
                               stop=stop, label=role)
        model.eval()
        acc = greedy_accuracy(model, tokenizer, task.test, task.rewards, wl.max_new_tokens)
        path = out_dir / role
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        params = sum(p.numel() for p in model.parameters())
        result[role] = {"path": role, "test_accuracy": acc, "sft_steps": steps, "params": params,
                        "seconds": round(time.time() - t0, 1), "sha256": sha256(path / "model.safetensors")}
        log.info("%s: %d params, test accuracy %.3f after %d SFT steps", role, params, acc, steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "prepare.json").write_text(json.dumps(result, indent=2))
    return result
