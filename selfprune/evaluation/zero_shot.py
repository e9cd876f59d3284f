"""Zero-shot accuracy through lm-eval, the harness pruning papers report with.

The model object (dense or pruned) is driven through lm-eval's HF wrapper, so heads and channels removed in
memory count without saving and reloading. Tasks come from one of two places:

* ``local``: the YAML definitions in ``selfprune/evaluation/tasks/``, whose prompts, choices and metrics are
  lm-eval's standard ones, reading the shared data's files (converted to the hub datasets' records);
* ``hub``: lm-eval's standard tasks themselves, which download their datasets from the Hugging Face hub.

``auto`` picks ``local`` when a data directory is set (``--data-dir`` or ``SELFPRUNE_DATA_DIR``), else ``hub``.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from ..data import DATA_DIR_ENV, resolve_data_dir
from ..errors import SelfpruneError, option
from .tasks import TASKS_DIR
from .tasks.readers import LOCAL_FILES

TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# The metric each paper table reports (LLM-Pruner, FLAP, SliceGPT, Self-Pruner): length-normalised accuracy
# where answers differ in length, plain accuracy for yes/no (BoolQ) and the two-context WinoGrande.
REPORTED_METRIC = {
    "boolq": "acc",
    "piqa": "acc_norm",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
}
SOURCES = ("auto", "local", "hub")
HELLASWAG_NOTE = (
    "local hellaswag reads a preprocessed text form without the ctx_a/ctx_b split: "
    "close to, not guaranteed equal to, lm-eval's hellaswag"
)


def parse_tasks(tasks: list[str] | str | None) -> list[str]:
    """Task names from a list or a comma list ("all" or None = the seven), checked against ``TASKS``."""
    if tasks is None or tasks == "all":
        return list(TASKS)
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise SelfpruneError(
            f"unknown task {', '.join(map(repr, unknown)) or '(none given)'}: choose from {', '.join(TASKS)}"
        )
    return list(dict.fromkeys(names))


def resolve_source(source: str, data_dir=None) -> tuple[str, Path | None]:
    """(``"local"`` or ``"hub"``, data directory) for the requested source."""
    if source not in SOURCES:
        raise SelfpruneError(f"unknown source {source!r}: use one of {', '.join(SOURCES)}")
    directory = resolve_data_dir(data_dir)
    if source == "auto":
        source = "local" if directory is not None else "hub"
    if source == "local" and directory is None:
        raise SelfpruneError(f"source 'local' needs a data directory: pass {option('data_dir')} or set {DATA_DIR_ENV}")
    if source == "hub":
        from ..data import hub_reachable

        if not hub_reachable():
            raise SelfpruneError(f"the tasks' hub datasets cannot be reached (offline): pass {option('data_dir')} "
                                 f"(or set {DATA_DIR_ENV}) with a folder holding the local copies")
    return source, directory


def check_local_files(names: list[str], data_dir: Path) -> dict[str, str]:
    """Each task's source label; fails on the first missing file before any model time is spent."""
    sources = {}
    for name in names:
        paths = [data_dir / rel for rel in LOCAL_FILES[name]]
        for path in paths:
            if not path.is_file():
                raise SelfpruneError(
                    f"missing data file {path} for task {name}: restore it, point {option('data_dir')} at a "
                    f"complete data folder, or use {option('source')} hub with network access"
                )
        sources[name] = f"local:{paths[0]}"
    return sources


def _drop_custom_kwargs_hint(record: logging.LogRecord) -> bool:
    # lm-eval warns on every task with a custom_dataset that kwargs can be passed with --metadata; ours are.
    return "Custom kwargs can be passed" not in record.getMessage()


def _drop_model_object_notice(record: logging.LogRecord) -> bool:
    # HFLM warns whenever it wraps a model object instead of a name, which is how pruned models are passed.
    return "model kwarg is not of type" not in record.getMessage()


def _git_hash_quietly():
    """lm-eval records the git commit of the working directory; outside a repository its `git describe`
    prints "fatal: not a git repository" to the terminal. Same lookup, git's stderr discarded."""
    import subprocess

    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError, OSError):
        return None


def _quiet_lm_eval() -> None:
    """Keep lm-eval's warnings, drop its per-request INFO chatter and the notices that say nothing to a user."""
    import lm_eval.evaluator

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    for name, drop in (("lm_eval.api.task", _drop_custom_kwargs_hint),
                       ("lm_eval.models.huggingface", _drop_model_object_notice)):
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)
    lm_eval.evaluator.get_git_commit_hash = _git_hash_quietly


def build_tasks(names: list[str], source: str, data_dir: Path | None) -> tuple[object, dict, dict[str, str]]:
    """The lm-eval TaskManager, its Task objects by name (datasets loaded) and each task's source label."""
    from lm_eval.tasks import TaskManager

    if source == "local":
        sources = check_local_files(names, data_dir)
        # The data directory reaches each task's custom_dataset reader through the TaskManager metadata.
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(data_dir)})
    else:
        manager = TaskManager()
        sources = {}
    tasks = {}
    for name in names:
        try:
            loaded = manager.load([name])["tasks"]
        except Exception as exc:
            reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
            if source == "hub":
                raise SelfpruneError(
                    f"could not load task {name} from the Hugging Face hub ({reason}): "
                    f"pass --data-dir (or set {DATA_DIR_ENV}) to a folder with the local copies"
                ) from None
            raise SelfpruneError(f"could not read the local data for task {name} ({reason}): check the files under {data_dir}") from None
        (task,) = loaded.values()
        tasks[name] = task
        if source == "hub":
            config = task.config
            sources[name] = f"hub:{config.dataset_path}" + (f"/{config.dataset_name}" if config.dataset_name else "")
    return manager, tasks, sources


def evaluate_zero_shot(
    model,
    tokenizer,
    tasks: list[str] | str,
    *,
    limit: int | None = None,
    data_dir=None,
    batch_size: int = 8,
    seed: int = 0,
    source: str = "auto",
) -> dict:
    """Zero-shot accuracy of ``model`` on ``tasks``, one reported metric per task (see ``REPORTED_METRIC``).

    ``limit`` keeps the first N items of each task, so every model sees the same items. Returns
    ``{"tasks": {name: {"metric", "value", "stderr", "n", "source"}}, "average", "limit", "seed",
    "lm_eval_version", "settings"}``; the average is the unweighted mean of the reported metrics.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise SelfpruneError(f"limit must be a positive whole number, not {limit!r}: pass {option('limit')} N or leave it out")
    if batch_size < 1:
        raise SelfpruneError(f"batch size must be at least 1, not {batch_size}: pass {option('batch_size')} N")
    source, directory = resolve_source(source, data_dir)
    _quiet_lm_eval()
    manager, task_objects, sources = build_tasks(names, source, directory)

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(task_objects.values()),
        task_manager=manager,
        num_fewshot=0,
        limit=limit,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
    )

    per_task = {}
    for name in names:
        metric = REPORTED_METRIC[name]
        row = raw["results"][name]
        stderr = row.get(f"{metric}_stderr,none")
        per_task[name] = {
            "metric": metric,
            "value": float(row[f"{metric},none"]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "n": int(raw["n-samples"][name]["effective"]),
            "source": sources[name],
        }
    settings = {
        "source": source,
        "data_dir": str(directory) if directory is not None else None,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "model_class": type(model).__name__,
        "task_versions": {name: raw.get("versions", {}).get(name) for name in names},
    }
    if source == "local" and "hellaswag" in names:
        settings["note"] = HELLASWAG_NOTE
    return {
        "tasks": per_task,
        "average": sum(r["value"] for r in per_task.values()) / len(per_task),
        "limit": limit,
        "seed": seed,
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _dist_version("lm_eval"),
        "settings": settings,
    }


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def format_table(results: dict) -> str:
    """A markdown table: one row per task (metric, value, stderr, items), the average, and the limit used."""
    lines = ["| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for name, row in results["tasks"].items():
        stderr = "" if row["stderr"] is None or math.isnan(row["stderr"]) else f"±{row['stderr']:.4f}"
        lines.append(f"| {name} | {row['metric']} | {row['value']:.4f} | {stderr} | {row['n']} |")
    lines.append(f"| **average** |  | {results['average']:.4f} |  |  |")
    limit = results.get("limit")
    lines.append("")
    lines.append(f"limit: first {limit} items per task" if limit else "limit: none (full evaluation sets)")
    return "\n".join(lines)
