"""A readable report of one recovery: its settings, the held-out numbers before and after, and the loss curves.

``selfprune report FOLDER`` comes here when FOLDER is a recovered model (``selfprune recover --out`` once it
finished: the settings and before/after numbers are in ``config.json``, the logged curve in
``selfprune_report.json``) or a recovery run still going or stopped (``recovery_run.json`` and ``log.jsonl``).
It writes ``report.md`` and ``loss.png``: training loss, held-out next-token loss and held-out KL to the
teacher against tokens seen, all in nats per token.
"""
from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

from ..errors import SelfpruneError
from ..io import atomic_write_text, lock_path_for, read_jsonl
from .report import _finite, _g, _save_figure, _table

# The trainer's file names (selfprune.recovery.trainer), repeated here so that reporting a search run does not
# import torch; tests/test_recovery_report.py checks that the two agree.
RUN_FILE = "recovery_run.json"
LOG_FILE = "log.jsonl"
LATEST_FILE = "latest_checkpoint.json"
REPORT_FILE = "selfprune_report.json"
FIGURES = ("loss.png",)

METHOD_TEXT = {"kd": "KL(teacher || student) on next-token distributions", "lm": "next-token loss on the data",
               "mix": "a mix of KL to the teacher and next-token loss"}


# -- reading ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SelfpruneError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): fix or restore it") from None


def _recorded_recovery(folder: Path) -> dict | None:
    """The recovery record in a model folder's config.json, or None (no config.json, or not recovered)."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    recovery = (data.get("selfprune") or {}).get("recovery") if isinstance(data, dict) else None
    return recovery if isinstance(recovery, dict) else None


def is_recovery_folder(folder) -> bool:
    """A recovery run folder (finished or not) rather than a search run: decided by its files alone."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "journal.jsonl").is_file():
        return False
    return (folder / RUN_FILE).is_file() or _recorded_recovery(folder) is not None


def _run_state(folder: Path) -> str:
    """``running (pid N)`` while a live process on this host holds the run's lock, else ``stopped``."""
    try:
        holder = json.loads(lock_path_for(folder).read_text())
        pid = int(holder["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return "stopped"
    if holder.get("host") != socket.gethostname():
        return f"locked by pid {pid} on {holder.get('host')}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "stopped"
    except PermissionError:
        pass  # alive, owned by someone else
    return f"running (pid {pid})"


def load_recovery(folder) -> dict:
    """Settings, data, sources, summary and logged curve of a recovery, from a finished or unfinished folder."""
    folder = Path(folder)
    recorded = _recorded_recovery(folder)
    if recorded is not None and not (folder / RUN_FILE).is_file():
        report_file = folder / REPORT_FILE
        curve = (_read_json(report_file).get("recovery") or {}).get("curve") if report_file.is_file() else None
        summary = recorded.get("summary") or {}
        if not curve:  # a copied folder without its report file: the two held-out points still make a curve
            steps, tokens = summary.get("steps", 0), summary.get("tokens", 0)
            curve = [{"step": 0, "tokens": 0, **summary.get("initial", {})},
                     {"step": steps, "tokens": tokens, **summary.get("final", {})}]
        return {"dir": folder, "finished": True, "settings": recorded.get("settings") or {},
                "data": recorded.get("data") or {}, "sources": recorded.get("sources") or {},
                "summary": summary, "curve": curve}
    run = _read_json(folder / RUN_FILE)
    latest = folder / LATEST_FILE
    return {"dir": folder, "finished": False, "settings": run.get("config") or {}, "data": run.get("data") or {},
            "sources": run.get("sources") or {}, "summary": {}, "curve": read_jsonl(folder / LOG_FILE),
            "checkpoint_step": _read_json(latest).get("step") if latest.is_file() else None,
            "state": _run_state(folder)}


def curve_points(curve: list[dict], key: str) -> list[tuple[int, float]]:
    """(tokens seen, value) of every logged entry that has a finite ``key``: what loss.png draws."""
    return [(int(e["tokens"]), _finite(e[key])) for e in curve if _finite(e.get(key)) is not None]


# -- plot ------------------------------------------------------------------------------------------------
def plot_loss_curves(recovery: dict, path: Path):
    """Three panels over tokens seen: training loss, held-out next-token loss, held-out KL to the teacher
    (separate panels: with few evaluations, twin axes would draw the two held-out lines on top of each other).
    Returns the figure, whose lines carry the logged values."""
    from matplotlib.figure import Figure  # Figure + savefig uses Agg and leaves pyplot's global state alone
    from matplotlib.ticker import EngFormatter

    curve, method = recovery["curve"], recovery["settings"].get("method", "?")
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    train_ax, loss_ax, kl_ax = fig.subplots(1, 3, sharex=True)
    panels = [
        (train_ax, "train_loss", "training loss", f"Training loss ({method}: {METHOD_TEXT.get(method, method)})",
         "#4C72B0", "no training step logged yet"),
        (loss_ax, "heldout_lm_loss", "held-out next-token loss", "Held-out next-token loss", "#55A868",
         "no held-out evaluation yet"),
        (kl_ax, "heldout_kl", "held-out KL(teacher || student)", "Held-out KL(teacher || student)", "#DD8452",
         "no teacher: KL not measured" if recovery["settings"].get("method") == "lm" else "no held-out evaluation yet"),
    ]
    for ax, key, label, title, color, empty in panels:
        points = curve_points(curve, key)
        if points:
            ax.plot(*zip(*points), "o-", markersize=3.5, color=color, label=label)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(f"{label} (nats/token)", fontsize=8)
        ax.set_xlabel("tokens seen")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
    seen = [int(e["tokens"]) for e in curve if "tokens" in e]
    if not recovery["finished"]:  # a run in progress: the axis spans the whole run, so the plot shows how far it is
        per_step = _tokens_per_step(recovery["settings"])
        seen.append(recovery["settings"].get("tokens", 0) // per_step * per_step if per_step else 0)
    if seen and max(seen) > 0:
        train_ax.set_xlim(-0.03 * max(seen), 1.03 * max(seen))  # every panel from token 0 to the end
    _save_figure(fig, path)
    return fig


# -- sections --------------------------------------------------------------------------------------------
def _tokens_per_step(settings: dict) -> int:
    return int(settings.get("batch_size", 0)) * int(settings.get("grad_accum", 1)) * int(settings.get("seq_len", 0))


def _lora_text(settings: dict) -> str:
    rank = settings.get("lora_rank") or 0
    if not rank:
        return "full fine-tuning (every weight trained)"
    alpha = settings.get("lora_alpha") or 2 * rank
    return f"LoRA rank {rank}, alpha {alpha:g} on q/k/v/o and gate/up/down, merged into the weights at the end"


def settings_section(recovery: dict) -> str:
    s, data, sources, summary = recovery["settings"], recovery["data"], recovery["sources"], recovery["summary"]
    method = s.get("method", "?")
    method_text = METHOD_TEXT.get(method, method)
    if method in ("kd", "mix"):
        method_text += f", temperature {_g(s.get('temperature'))}"
    if method == "mix":
        method_text += f", KD share {_g(s.get('kd_weight'))}"
    teacher = sources.get("teacher")
    per_step = _tokens_per_step(s)
    total_steps = s.get("tokens", 0) // per_step if per_step else 0
    accumulated = s.get("grad_accum", 1)
    step_shape = (f"{s.get('batch_size')} sequences x {s.get('seq_len')} tokens"
                  + (f" x {accumulated} accumulated micro-batches" if accumulated != 1 else ""))
    if recovery["finished"]:
        trained = (f"{summary.get('tokens', 0):,} of {s.get('tokens', 0):,} requested ({summary.get('steps')} steps "
                   f"of {step_shape})")
    else:
        done = max((e.get("step", 0) for e in recovery["curve"]), default=0)
        trained = (f"{done * per_step:,} so far of {total_steps * per_step:,} ({done} of {total_steps} steps "
                   f"of {step_shape})")
    rows = [
        ["pruned model (student)", f"`{sources['model']}`" if sources.get("model") else "given as a Python object"],
        ["teacher", f"`{teacher}`" if teacher else "given as a Python object" if "teacher" not in sources
                    and (method != "lm" or curve_points(recovery["curve"], "heldout_kl"))
                    else "none (method lm without a teacher: no KL measured)"],
        ["method", f"{method}: {method_text}"],
        ["trained parameters", _lora_text(s)],
        ["training tokens", trained],
        ["data", f"{data.get('data', s.get('data'))}/{data.get('split', s.get('data_split'))}"
                 + (f" (`{data['origin']}`)" if data.get("origin") else "")
                 + (f", {data['train_sequences']:,} training sequences" if data.get("train_sequences") else "")],
        ["held-out slice", f"{data.get('heldout_sequences', s.get('heldout_sequences'))} sequences "
                           f"({data.get('heldout_tokens', 0):,} tokens) at the end of the data, never trained on"],
        ["sequence length", s.get("seq_len")],
        ["learning rate", f"{_g(s.get('learning_rate'))} peak (AdamW), {_g(100 * (s.get('warmup_ratio') or 0))}% "
                          f"linear warm-up then cosine decay; weight decay {_g(s.get('weight_decay'))}, gradient "
                          f"clipping at {_g(s.get('max_grad_norm'))}"],
        ["precision, device", f"{sources['dtype']} on {sources.get('device', '?')}"
                              + (f" (device_map {sources['device_map']})" if sources.get("device_map") else "")
         if sources.get("dtype") else "as the models given from Python were loaded"],
        ["seed", s.get("seed")],
    ]
    if recovery["finished"]:
        seconds = _finite(summary.get("train_seconds"))
        speed = f" ({summary.get('tokens', 0) / seconds:,.1f} tokens/s)" if seconds else ""
        resumed = (f", resumed once from step {summary['resumed_from_step']}"
                   if summary.get("resumed_from_step") else "")
        rows.append(["training time", f"{_g(seconds)} s{speed}{resumed}; includes the held-out evaluations"])
    else:
        checkpoint = recovery.get("checkpoint_step")
        how = (f"`selfprune recover --resume {recovery['dir']}`" if sources.get("model")
               else "`recover(..., resume=True)` with the same models (it was started from Python)")
        rows.append(["state", f"{recovery['state']}; last checkpoint "
                              + (f"at step {checkpoint}" if checkpoint else "none yet")
                              + f"; resume a stopped run with {how}"])
    return _table(["", "value"], rows, "ll")


def before_after(recovery: dict) -> tuple[dict, dict, str]:
    """Held-out numbers before training and after it (or at the latest evaluation of an unfinished run)."""
    if recovery["finished"] and recovery["summary"].get("final"):
        return recovery["summary"].get("initial", {}), recovery["summary"]["final"], "after"
    evaluated = [e for e in recovery["curve"] if _finite(e.get("heldout_lm_loss")) is not None]
    first = next((e for e in evaluated if e.get("step") == 0), {})
    latest = evaluated[-1] if evaluated and evaluated[-1].get("step") else {}
    return first, latest, f"latest (step {latest.get('step')})" if latest else "latest (none yet)"


def numbers_section(recovery: dict) -> str:
    before, after, label = before_after(recovery)
    rows = []
    for key, name in (("heldout_lm_loss", "held-out next-token loss (nats/token)"),
                      ("heldout_kl", "held-out KL(teacher || student) (nats/token)")):
        b, a = _finite(before.get(key)), _finite(after.get(key))
        change = f"{a - b:+.6g}" if a is not None and b is not None else ""
        rows.append([name, _g(b), _g(a), change])
    b, a = _finite(before.get("heldout_lm_loss")), _finite(after.get("heldout_lm_loss"))
    rows.append(["held-out perplexity (exp of the loss)", _g(math.exp(b) if b is not None else None),
                 _g(math.exp(a) if a is not None else None),
                 f"{math.exp(a) / math.exp(b):.4f}x" if a is not None and b is not None else ""])
    return _table(["", "before", label, "change"], rows)


def curve_section(curve: list[dict]) -> str:
    rows = [[e.get("step"), f"{int(e.get('tokens', 0)):,}", _g(e.get("train_loss")), _g(e.get("heldout_lm_loss")),
             _g(e.get("heldout_kl")), _g(e.get("lr"), 3), _g(e.get("grad_norm"), 4), _g(e.get("seconds"))]
            for e in curve]
    rows = [["" if c == "n/a" else c for c in row] for row in rows]
    return _table(["step", "tokens seen", "training loss", "held-out loss", "held-out KL", "lr", "grad norm",
                   "seconds since start"], rows)


# -- the report --------------------------------------------------------------------------------------------
def build_recovery_report(folder, out_dir=None) -> Path:
    """Write ``report.md`` and ``loss.png`` for the recovery in ``folder``; returns report.md."""
    recovery = load_recovery(folder)
    out = Path(out_dir) if out_dir is not None else recovery["dir"] / "report"
    if out.exists() and not out.is_dir():
        raise SelfpruneError(f"--out {out} exists and is not a folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    plot_loss_curves(recovery, out / "loss.png")
    s, folder = recovery["settings"], recovery["dir"]
    if recovery["finished"]:
        intro = f"Recovered model `{folder}`, trained from the pruned model on {s.get('tokens', 0):,} requested tokens."
    else:
        intro = (f"Recovery run `{folder}`, not finished ({recovery['state']}): the numbers below are the logged "
                 "ones so far. When the run finishes this folder becomes the recovered model (and the report "
                 "written inside it goes): run `selfprune report` on it again then.")
    _, _, label = before_after(recovery)
    sections = [
        f"# Recovery report: `{folder.name}`", intro,
        "## Settings", settings_section(recovery),
        "## Held-out numbers: before training and " + ("after" if label == "after" else "so far"),
        "Measured on the held-out slice of the training data (never trained on). KL is KL(teacher || student) per "
        "token at temperature 1.",
        numbers_section(recovery),
        "## Loss curves", "![loss curves](loss.png)",
        f"Training loss is the mean over the {s.get('log_every', '?')} steps before each log line (for method "
        f"{s.get('method', '?')}: {METHOD_TEXT.get(s.get('method'), '?')}); held-out loss and KL are measured "
        f"every {s.get('eval_every', '?')} steps and at the end. All in nats per token. The logged values:",
        curve_section(recovery["curve"]),
        "## Record", "The recorded settings, data and sources, verbatim:",
        "```json\n" + json.dumps({"settings": s, "data": recovery["data"], "sources": recovery["sources"]}, indent=2)
        + "\n```",
    ]
    report = out / "report.md"
    atomic_write_text(report, "\n\n".join(sections) + "\n")
    return report
