"""Recovery after pruning: distil the pruned model from its dense parent (or fine-tune it), fully or with LoRA.

Python::

    from selfprune.recovery import RecoveryConfig, recover
    recovered, summary = recover(pruned, tokenizer, "pruned/x-kd", teacher=dense,
                                 config=RecoveryConfig(method="kd", tokens=500_000))

From model specs (what ``selfprune recover`` calls), and resuming a killed run from its folder alone::

    recover_from_specs("pruned/x", "pruned/x-kd", teacher="default", config=RecoveryConfig(...))
    resume_run("pruned/x-kd")

After a search (what ``selfprune search --recover-tokens N`` calls), into ``RUN/model-recovered``::

    facts = recover_search_model("RUN/model", teacher="default", tokens=50_000)
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..errors import SelfpruneError
from ..io import restore_interrupted
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


RECOVERED_SUFFIX = "-recovered"


def recovered_model_dir(model_dir) -> Path:
    """Where :func:`recover_search_model` puts the recovered copy of ``model_dir``: ``RUN/model-recovered``."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + RECOVERED_SUFFIX)


def pruned_model_fingerprint(model_dir) -> str:
    """A short hash of what makes a saved pruned model what it is (its pruning spec and kept indices): a
    search that found a new best model re-saves ``RUN/model`` with another fingerprint."""
    from ..pruned_format import INDICES_FILE

    model_dir = Path(model_dir)
    spec = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("selfprune") or {}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8"))
    indices = model_dir / INDICES_FILE
    if indices.is_file():
        digest.update(indices.read_bytes())
    return digest.hexdigest()[:16]


def _search_recovery_facts(out_dir: Path, settings: dict, summary: dict, seconds: float, reused: bool) -> dict:
    """What the search summary records about the recovery of its best model."""
    before, after = summary.get("initial", {}), summary.get("final", {})
    facts = {"path": str(out_dir), "method": settings["method"], "lora_rank": settings["lora_rank"],
             "tokens": summary["tokens"], "steps": summary["steps"], "train_seconds": summary["train_seconds"],
             "seconds": round(seconds, 1), "resumed_from_step": summary.get("resumed_from_step", 0), "reused": reused,
             "heldout_lm_loss": {"before": before.get("heldout_lm_loss"), "after": after.get("heldout_lm_loss")}}
    if "heldout_kl" in after:
        facts["heldout_kl"] = {"before": before.get("heldout_kl"), "after": after["heldout_kl"]}
    return facts


def recover_search_model(model_dir, teacher: str | None, tokens: int, data_dir=None, *,
                         teacher_model=None, teacher_tokenizer=None, dtype: str = "float32", device: str = "cpu",
                         device_map=None, teacher_device_map=None, progress: bool = True, on_step=None,
                         **settings) -> dict:
    """Recover the best model a search saved (``RUN/model``) into ``RUN/model-recovered``; returns facts for
    the search summary: ``path``, ``tokens``, ``steps``, ``train_seconds``, ``seconds`` (this call, loading
    included), ``heldout_lm_loss`` / ``heldout_kl`` as ``{"before", "after"}`` (nats/token on the held-out
    slice of the training data), ``reused``.

    ``teacher`` is the spec of the dense model the search pruned (its ``config["model"]``), recorded so the
    run can be resumed from its folder; pass the already loaded dense model as ``teacher_model`` (and its
    tokenizer) to spare loading it again. ``settings`` are any other :class:`RecoveryConfig` fields
    (``method``, ``lora_rank``, ``seq_len``, ...); the defaults are KD, full fine-tuning, 8 x 128 tokens a step.

    Why a sibling folder rather than replacing ``RUN/model`` in place: ``RUN/model`` is the model the
    search's fitness numbers (and any ``ppl.json`` / ``eval.json`` measured on it) describe, and the search
    re-saves it whenever the run is finished or resumed, which would silently undo an in-place recovery. A
    separate folder keeps both models to compare, lets a recovery with other settings start again from the
    untouched pruned model, and is an ordinary recovery run folder while training (checkpoints,
    ``selfprune recover --resume RUN/model-recovered`` after a kill; written atomically at the end). The
    price is one more copy of the model on disk.

    Calling it again is safe: a finished recovery with the same settings from the same pruned model is
    returned as recorded (``reused``: true, no training); an unfinished one with the same settings is
    resumed; anything else there is recovered afresh.

    Cost, measured on this project's machine (bench/results/recover.json): SmolLM2-135M pruned 20%, KD, full
    fine-tuning, fp32 on a shared 2-core CPU, 4 x 256 tokens a step: about 15 tokens/s (19,456 tokens in
    1,257 s, the two held-out evaluations with the teacher included) at 7.1 GB peak memory, so 50k tokens take
    about an hour there (no GPU timing has been measured). Memory: the student with its gradients and two
    AdamW moments (4x its weights in full fine-tuning, far less with LoRA) plus the teacher and the logits
    (batch x seq-len x vocabulary floats, several times over).
    """
    from ..models import load_model

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise SelfpruneError(f"no saved model at {model_dir}: the search saves its best model there when it "
                             "finishes; run it to the end first")
    config = RecoveryConfig(tokens=tokens, **settings)
    if config.total_steps == 0:  # before any model is loaded
        raise SelfpruneError(f"recovery tokens {config.tokens} are less than one optimizer step "
                             f"({config.tokens_per_step} tokens): recover on more tokens")
    if config.needs_teacher and teacher is None and teacher_model is None:
        raise SelfpruneError(f"method {config.method!r} distils from a teacher: give the dense model the search "
                             "pruned, or use method 'lm'")
    out_dir = recovered_model_dir(model_dir)
    fingerprint = pruned_model_fingerprint(model_dir)
    started = time.perf_counter()
    resume = False
    restore_interrupted(out_dir)  # a kill while the last recovery swapped its model in left it aside
    if out_dir.exists():
        finished_run = (out_dir / "config.json").is_file() and not (out_dir / RUN_FILE).is_file()
        recorded_file = out_dir / RUN_FILE if not finished_run else out_dir / "config.json"
        try:
            recorded = json.loads(recorded_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise SelfpruneError(f"{out_dir} exists and is not a recovery of {model_dir}: move it away, then "
                                 "retry") from None
        if finished_run:
            recorded = (recorded.get("selfprune") or {}).get("recovery")
            if not isinstance(recorded, dict):
                raise SelfpruneError(f"{out_dir} exists and is not a recovery of {model_dir}: move it away, then "
                                     "retry")
        same = (recorded.get("settings" if finished_run else "config") == config.to_dict()
                and (recorded.get("sources") or {}).get("model_fingerprint") == fingerprint)
        if same and finished_run:
            return _search_recovery_facts(out_dir, recorded["settings"], recorded["summary"],
                                          time.perf_counter() - started, reused=True)
        resume = same
    student, tokenizer = load_model(str(model_dir), dtype=dtype, device=device, device_map=device_map)
    if teacher_model is None and teacher is not None:
        teacher_model, teacher_tokenizer = load_model(teacher, dtype=dtype, device=device,
                                                      device_map=teacher_device_map)
    sources = {"model": str(model_dir), "teacher": teacher, "dtype": dtype, "device": device,
               "device_map": device_map, "teacher_device_map": teacher_device_map,
               "data_dir": str(data_dir) if data_dir is not None else None, "model_fingerprint": fingerprint}
    _, summary = recover(student, tokenizer, out_dir, teacher=teacher_model, config=config, data_dir=data_dir,
                         teacher_tokenizer=teacher_tokenizer, resume=resume, overwrite=not resume,
                         progress=progress, sources=sources, on_step=on_step)
    return _search_recovery_facts(out_dir, config.to_dict(), summary, time.perf_counter() - started, reused=False)


__all__ = ["METHODS", "RecoveryConfig", "recover", "recover_from_specs", "resume_run", "recover_search_model",
           "recovered_model_dir", "attach_lora", "merge_lora", "kd_loss", "lm_loss", "heldout_metrics",
           "load_training_data"]
