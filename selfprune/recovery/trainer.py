"""Recovery training: distil a pruned model from its dense parent (or fine-tune it on next-token loss).

Why an explicit loop rather than transformers' ``Trainer``: the resume contract here is that ``kill -9`` at
any moment, then resume, ends with weights bitwise equal to an uninterrupted run. ``Trainer`` writes each
``checkpoint-N`` folder in place (a kill during the save leaves a partial folder that
``resume_from_checkpoint=True`` then picks as the newest), re-derives the data position by replaying the
sampler, and needs ``compute_loss`` overridden plus a teacher smuggled in for distillation. The loop below is
~150 lines on torch (``AdamW``), transformers (``get_cosine_schedule_with_warmup``), peft (LoRA) and
safetensors: each checkpoint is a complete folder written atomically and named by one atomically written
pointer, and the data position is a pure function of the step (a seeded shuffle per epoch). Teacher logits
are computed on the fly, never cached. Precision: fp32 as loaded; no autocast path, because nothing here
(CPU only) could exercise a bf16 / fp16 GPU path - load the models in bf16 with ``dtype`` if you need it.
"""
from __future__ import annotations

import copy
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import SelfpruneError, option
from ..io import (append_jsonl, atomic_directory, atomic_write_json, atomic_write_text, discard_on_failure,
                  recover_directory, run_lock)
from .data import PackedData, load_training_data, sequence_order
from .lora import attach_lora, merge_lora

METHODS = ("kd", "lm", "mix")
RUN_FILE = "recovery_run.json"
LATEST_FILE = "latest_checkpoint.json"
LOG_FILE = "log.jsonl"


# Full fine-tuning: 3e-4 beat the first default, 1e-4, in every pair bench_recover.py ran (one run each: uniform
# 20% on 20k and 0.1M tokens, searched 20% and uniform 50% on 0.1M; 1e-3 was worse than both). LoRA's 5e-4 is
# untuned.
DEFAULT_LEARNING_RATE = {"full": 3e-4, "lora": 5e-4}


@dataclass
class RecoveryConfig:
    """Every setting that changes the result; recorded in the run folder and in the recovered model."""

    method: str = "kd"                 # kd: KL(teacher || student); lm: next-token loss; mix: kd_weight * kd + rest lm
    tokens: int = 100_000              # training tokens (rounded down to whole optimizer steps)
    seq_len: int = 128
    batch_size: int = 8                # sequences per micro-batch
    grad_accum: int = 1
    learning_rate: float | None = None  # None: 3e-4 full fine-tuning, 5e-4 LoRA (see DEFAULT_LEARNING_RATE)
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    kd_weight: float = 0.5             # share of the KD term in method "mix"
    lora_rank: int = 0                 # 0: full fine-tuning
    lora_alpha: float | None = None    # None: 2 x rank
    data: str = "c4"
    data_split: str = "validation"
    heldout_sequences: int = 32
    eval_every: int = 25               # optimizer steps between held-out evaluations
    log_every: int = 5
    checkpoint_every: int = 25
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise SelfpruneError(f"unknown recovery method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATE["lora" if self.lora_rank else "full"]
        positive = {"tokens": self.tokens, "seq_len": self.seq_len, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "eval_every": self.eval_every, "log_every": self.log_every,
                    "checkpoint_every": self.checkpoint_every, "temperature": self.temperature,
                    "learning_rate": self.learning_rate}
        for name, value in positive.items():
            if not value > 0:
                raise SelfpruneError(f"{option(name)} {value} must be positive: give a value above 0")
        if self.lora_rank < 0:
            raise SelfpruneError(f"{option('lora_rank')} {self.lora_rank} is negative: use 0 for full fine-tuning "
                                 "or a rank like 16")
        if not 0.0 <= self.kd_weight <= 1.0:
            raise SelfpruneError(f"{option('kd_weight')} {self.kd_weight} must lie in [0, 1]: give a share of the KD term")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise SelfpruneError(f"{option('warmup_ratio')} {self.warmup_ratio} must lie in [0, 1): give a fraction of the steps")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    @property
    def total_steps(self) -> int:
        return self.tokens // self.tokens_per_step

    @property
    def needs_teacher(self) -> bool:
        return self.method in ("kd", "mix")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RecoveryConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per token on temperature-softened distributions, times T^2 (Hinton et al.)."""
    student_log = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = F.kl_div(student_log, teacher_log, log_target=True, reduction="none").sum(-1)
    return per_token.mean() * temperature**2


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (nats per predicted token)."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _device_of(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def check_teacher(student, teacher, tokenizer=None, teacher_tokenizer=None) -> None:
    """The KL needs both models to predict over the same vocabulary."""
    s_vocab, t_vocab = student.config.vocab_size, teacher.config.vocab_size
    if s_vocab != t_vocab:
        raise SelfpruneError(f"teacher vocabulary ({t_vocab} tokens) differs from the student's ({s_vocab}): "
                             "use the dense model the student was pruned from as teacher")
    if tokenizer is not None and teacher_tokenizer is not None and tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise SelfpruneError("teacher tokenizer differs from the student's: use the dense model the student "
                             "was pruned from as teacher")


def _shares_tensors(a, b) -> bool:
    pointers = {p.data_ptr() for p in a.parameters()}
    return any(p.data_ptr() in pointers for p in b.parameters())


class _Run:
    """One recovery run in ``out_dir``: its settings, log, checkpoints and final model."""

    def __init__(self, out_dir: Path, config: RecoveryConfig):
        self.out_dir, self.config = out_dir, config

    def latest_checkpoint(self) -> Path | None:
        pointer = self.out_dir / LATEST_FILE
        if not pointer.is_file():
            return None
        return self.out_dir / json.loads(pointer.read_text())["checkpoint"]

    def save_checkpoint(self, step: int, model, optimizer, scheduler, history: list[dict]) -> None:
        """A complete folder written atomically, then the pointer swapped atomically, then the old one removed."""
        from safetensors.torch import save_file

        name = f"checkpoint-{step:07d}"
        previous = self.latest_checkpoint()
        with atomic_directory(self.out_dir / name, overwrite=True) as tmp:
            trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(trainable, str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                       tmp / "optimizer.pt")
            atomic_write_json(tmp / "state.json", {"step": step, "history": history})
        atomic_write_json(self.out_dir / LATEST_FILE, {"checkpoint": name, "step": step})
        if previous is not None and previous.name != name:
            shutil.rmtree(previous, ignore_errors=True)

    def load_checkpoint(self, model, optimizer, scheduler) -> tuple[int, list[dict]]:
        from safetensors.torch import load_file

        path = self.latest_checkpoint()
        if path is None:
            return 0, []
        saved = load_file(str(path / "trainable.safetensors"))
        params = dict(model.named_parameters())
        missing = set(saved) ^ {n for n, p in params.items() if p.requires_grad}
        if missing:
            raise SelfpruneError(f"checkpoint {path} does not match this model ({len(missing)} tensors differ): "
                                 "resume with the same model and settings, or start a new run")
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
        state = torch.load(path / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        info = json.loads((path / "state.json").read_text())
        return info["step"], info["history"]


@torch.no_grad()
def heldout_metrics(student, teacher, heldout: torch.Tensor, batch_size: int = 8) -> dict:
    """Held-out next-token loss and, with a teacher, KL(teacher || student) at temperature 1 (both per token)."""
    was_training = student.training
    student.eval()
    lm_total, kl_total, rows = 0.0, 0.0, heldout.shape[0]
    for start in range(0, rows, batch_size):
        ids = heldout[start:start + batch_size]
        logits = student(ids.to(_device_of(student)), use_cache=False).logits
        count = ids.shape[0]
        lm_total += lm_loss(logits, ids.to(logits.device)).item() * count
        if teacher is not None:
            t_logits = teacher(ids.to(_device_of(teacher)), use_cache=False).logits.to(logits.device)
            kl_total += kd_loss(logits, t_logits).item() * count
    student.train(was_training)
    result = {"heldout_lm_loss": lm_total / rows}
    if teacher is not None:
        result["heldout_kl"] = kl_total / rows
    return result


def recover(student, tokenizer, out_dir, teacher=None, config: RecoveryConfig | None = None, data_dir=None,
            teacher_tokenizer=None, resume: bool = False, overwrite: bool = False, progress: bool = True,
            sources: dict | None = None, on_step: Callable[[dict], None] | None = None):
    """Train the pruned ``student`` towards ``teacher`` (or on next-token loss) and save it to ``out_dir``.

    ``out_dir`` holds the run (settings, ``log.jsonl``, the latest checkpoint) until the end, when it is
    replaced by the recovered model in the pruned format. ``resume=True`` continues from the last checkpoint
    (same settings required). ``sources`` (e.g. the model and teacher specs) is recorded so a run can be
    resumed from its folder alone. ``on_step`` is called with each step's record (for callers' own logging).
    Returns ``(recovered_model, summary)``; a student sharing tensors with the teacher is copied first.
    """
    config = config or RecoveryConfig()
    out_dir = Path(out_dir)
    if not hasattr(student.config, "selfprune"):
        raise SelfpruneError("the model to recover was not pruned by selfprune: prune it first (selfprune.prune)")
    if config.needs_teacher and teacher is None:
        raise SelfpruneError(f"method {config.method!r} distils from a teacher: give the dense model as "
                             f"{option('teacher')} or use method 'lm'")
    if teacher is not None:
        check_teacher(student, teacher, tokenizer, teacher_tokenizer)
    if config.total_steps == 0:
        raise SelfpruneError(f"{option('tokens')} {config.tokens} is less than one optimizer step ({option('batch_size')} "
                             f"x {option('grad_accum')} x {option('seq_len')} = {config.tokens_per_step} tokens): "
                             "train on more tokens or use smaller steps")
    record = {"config": config.to_dict(), "sources": sources or {}}
    with run_lock(out_dir):
        if resume:
            recover_directory(out_dir)  # a kill during the final save leaves the run folder beside it
            data = _check_resumable(out_dir, record, tokenizer, config, data_dir)
            return _recover(student, tokenizer, teacher, out_dir, config, data, record, True, progress, on_step)
        if out_dir.exists() and not overwrite:
            raise SelfpruneError(f"output folder {out_dir} already exists: choose another one, allow overwriting "
                                 "it, or resume the run in it")
        data = load_training_data(tokenizer, config.data, config.data_split, config.seq_len,
                                  config.heldout_sequences, data_dir)
        record["data"] = data.describe()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir(parents=True)
        with discard_on_failure(out_dir, setup_files=(RUN_FILE, LOG_FILE)):
            atomic_write_json(out_dir / RUN_FILE, record)
            return _recover(student, tokenizer, teacher, out_dir, config, data, record, False, progress, on_step)


def _check_resumable(out_dir: Path, record: dict, tokenizer, config: RecoveryConfig, data_dir) -> PackedData:
    if not (out_dir / RUN_FILE).is_file():
        if (out_dir / "config.json").is_file():
            raise SelfpruneError(f"{out_dir} holds a finished recovered model: nothing to resume")
        raise SelfpruneError(f"{out_dir} is not a recovery run folder (no {RUN_FILE}): check the path")
    recorded = json.loads((out_dir / RUN_FILE).read_text())
    if recorded["config"] != record["config"]:
        changed = sorted(k for k in record["config"] if recorded["config"].get(k) != record["config"][k])
        raise SelfpruneError(f"{out_dir} was started with different settings ({', '.join(changed)}): resume with "
                             "the recorded settings or start a new run in another folder")
    data = load_training_data(tokenizer, config.data, config.data_split, config.seq_len, config.heldout_sequences,
                              data_dir)
    if recorded["data"] | {"origin": None} != data.describe() | {"origin": None}:
        raise SelfpruneError(f"the training data of {out_dir} changed since the run started: restore the data "
                             "it was started with, or start a new run in another folder")
    # Recorded sources stay unless given anew: keys only one caller records (a model fingerprint) survive a resume.
    record |= {"data": recorded["data"], "sources": recorded.get("sources", {}) | record["sources"]}
    return data


def _recover(student, tokenizer, teacher, out_dir: Path, config: RecoveryConfig, data: PackedData, record: dict,
             resume: bool, progress: bool, on_step):
    from transformers import get_cosine_schedule_with_warmup

    run = _Run(out_dir, config)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
        if _shares_tensors(student, teacher):
            student = copy.deepcopy(student)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    if config.lora_rank:
        student.requires_grad_(False)
        model = attach_lora(student, config.lora_rank, config.lora_alpha)
    else:
        model = student.requires_grad_(True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    total = config.total_steps
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_ratio * total), total)
    start_step, history = run.load_checkpoint(model, optimizer, scheduler) if resume else (0, [])
    atomic_write_text(out_dir / LOG_FILE, "".join(json.dumps(h) + "\n" for h in history))
    if start_step == 0:
        history = [{"step": 0, "tokens": 0} | heldout_metrics(model, teacher, data.heldout)]
        append_jsonl(out_dir / LOG_FILE, history[0])
    summary = _train(model, teacher, data, config, run, optimizer, scheduler, start_step, history, progress, on_step)
    if config.lora_rank:
        student = merge_lora(model)
    student.eval().requires_grad_(False)
    summary = summary | {"final": heldout_metrics(student, teacher, data.heldout)}
    _save_recovered(student, tokenizer, out_dir, record, history, summary)
    return student, summary


def _train(model, teacher, data: PackedData, config: RecoveryConfig, run: _Run, optimizer, scheduler,
           start_step: int, history: list[dict], progress: bool, on_step) -> dict:
    from tqdm.auto import tqdm

    total = config.total_steps
    device = _device_of(model)
    bar = tqdm(total=total * config.tokens_per_step, initial=start_step * config.tokens_per_step, unit="tok",
               unit_scale=True, desc=f"recover ({config.method}{', LoRA' if config.lora_rank else ''})",
               disable=not progress, dynamic_ncols=True)
    started, window_losses = time.perf_counter(), []
    earlier_seconds = history[-1].get("seconds", 0.0) if history else 0.0
    for step in range(start_step, total):
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(config.grad_accum):
            position = (step * config.grad_accum + micro) * config.batch_size
            ids = data.train[sequence_order(data.train.shape[0], config.batch_size, position, config.seed)]
            logits = model(input_ids=ids.to(device), use_cache=False).logits
            loss = _loss(logits, ids.to(logits.device), teacher, config)
            (loss / config.grad_accum).backward()
            step_loss += loss.item() / config.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        done = step + 1
        window_losses.append(step_loss)
        bar.update(config.tokens_per_step)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        entry = {"step": done, "tokens": done * config.tokens_per_step, "train_loss": step_loss,
                 "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                 "seconds": round(earlier_seconds + time.perf_counter() - started, 2)}
        if done % config.log_every == 0 or done % config.eval_every == 0 or done == total:
            entry["train_loss"] = sum(window_losses) / len(window_losses)
            window_losses = []
            if done % config.eval_every == 0 or done == total:
                entry |= heldout_metrics(model, teacher, data.heldout)
            history.append(entry)
            append_jsonl(run.out_dir / LOG_FILE, entry)
        if done % config.checkpoint_every == 0 and done < total:
            run.save_checkpoint(done, model, optimizer, scheduler, history)
        if on_step is not None:
            on_step(entry)
    bar.close()
    return {"steps": total, "tokens": total * config.tokens_per_step,
            "train_seconds": round(earlier_seconds + time.perf_counter() - started, 1), "resumed_from_step": start_step,
            "initial": {k: v for k, v in history[0].items() if k.startswith("heldout")}}


def _loss(logits, ids, teacher, config: RecoveryConfig) -> torch.Tensor:
    if config.method == "lm":
        return lm_loss(logits, ids)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids.to(_device_of(teacher)), use_cache=False).logits.to(logits.device)
    distill = kd_loss(logits, teacher_logits, config.temperature)
    if config.method == "kd":
        return distill
    return config.kd_weight * distill + (1 - config.kd_weight) * lm_loss(logits, ids)


def _save_recovered(student, tokenizer, out_dir: Path, record: dict, history: list[dict], summary: dict) -> None:
    """Replace the run folder by the recovered model; settings and loss-curve summary go into its config and
    the full curve into its report file."""
    from ..pruned_format import read_report, save_pruned

    sources = record["sources"]
    recovery = {"settings": record["config"], "data": record["data"], "sources": sources, "summary": summary}
    student.config.selfprune = dict(student.config.selfprune) | {"recovery": recovery}
    previous = read_report(sources["model"]) if sources.get("model") and Path(sources["model"]).is_dir() else {}
    save_pruned(student, tokenizer, out_dir, previous | {"recovery": recovery | {"curve": history}}, overwrite=True)
