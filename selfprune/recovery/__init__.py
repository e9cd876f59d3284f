"""Recovery after pruning: distil the pruned model from its dense parent (or fine-tune it), fully or with LoRA.

Python::

    from selfprune.recovery import RecoveryConfig, recover
    recovered, summary = recover(pruned, tokenizer, "pruned/x-kd", teacher=dense,
                                 config=RecoveryConfig(method="kd", tokens=500_000))

From model specs (what ``selfprune recover`` calls), and resuming a killed run from its folder alone::

    recover_from_specs("pruned/x", "pruned/x-kd", teacher="default", config=RecoveryConfig(...))
    resume_run("pruned/x-kd")
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import SelfpruneError
from .data import load_training_data
from .lora import attach_lora, merge_lora
from .trainer import METHODS, RUN_FILE, RecoveryConfig, heldout_metrics, kd_loss, lm_loss, recover


def recover_from_specs(model: str, out_dir, teacher: str | None = "default", config: RecoveryConfig | None = None,
                       data_dir=None, dtype: str = "float32", device: str = "cpu", device_map=None,
                       teacher_device_map=None, overwrite: bool = False, progress: bool = True, on_step=None,
                       resume: bool = False):
    """Load the pruned model and its teacher from specs (folder, hub id, ``default``) and run :func:`recover`."""
    from ..models import load_model

    config = config or RecoveryConfig()
    out_dir = Path(out_dir)
    if not resume and out_dir.exists() and not overwrite:  # fail before loading any model
        raise SelfpruneError(f"output folder {out_dir} already exists: choose another output folder, pass "
                             "overwrite=True, or resume the run in it")
    student, tokenizer = load_model(model, dtype=dtype, device=device, device_map=device_map)
    teacher_model = teacher_tokenizer = None
    if teacher is not None:
        teacher_model, teacher_tokenizer = load_model(teacher, dtype=dtype, device=device,
                                                      device_map=teacher_device_map)
    sources = {"model": str(model), "teacher": teacher, "dtype": dtype, "device": device,
               "device_map": device_map, "teacher_device_map": teacher_device_map,
               "data_dir": str(data_dir) if data_dir is not None else None}
    return recover(student, tokenizer, out_dir, teacher=teacher_model, config=config, data_dir=data_dir,
                   teacher_tokenizer=teacher_tokenizer, resume=resume, overwrite=overwrite, progress=progress,
                   sources=sources, on_step=on_step)


def resume_run(out_dir, progress: bool = True, on_step=None):
    """Continue a killed recovery run from its folder: models, data and settings are read from its record."""
    out_dir = Path(out_dir)
    run_file = out_dir / RUN_FILE
    if not run_file.is_file():
        if (out_dir / "config.json").is_file():
            raise SelfpruneError(f"{out_dir} holds a finished recovered model: nothing to resume")
        raise SelfpruneError(f"{out_dir} is not a recovery run folder (no {RUN_FILE}): check the path")
    record = json.loads(run_file.read_text())
    sources = record.get("sources") or {}
    if not sources.get("model"):
        raise SelfpruneError(f"{out_dir} was started from Python with model objects: resume it with "
                             "recover(..., resume=True) and the same models")
    return recover_from_specs(sources["model"], out_dir, teacher=sources.get("teacher"),
                              config=RecoveryConfig.from_dict(record["config"]), data_dir=sources.get("data_dir"),
                              dtype=sources.get("dtype", "float32"), device=sources.get("device", "cpu"),
                              device_map=sources.get("device_map"),
                              teacher_device_map=sources.get("teacher_device_map"), progress=progress,
                              on_step=on_step, resume=True)


__all__ = ["METHODS", "RecoveryConfig", "recover", "recover_from_specs", "resume_run", "attach_lora", "merge_lora",
           "kd_loss", "lm_loss", "heldout_metrics", "load_training_data"]
