"""A readable report of one search run: markdown with PNG plots, ready to open or paste into a paper.

Given a recovered model folder (``selfprune recover --out``) or a recovery run still in progress instead,
``selfprune report`` writes that recovery's report (settings, held-out numbers, ``loss.png``): see
``selfprune.evaluation.recovery_report``.

``selfprune report RUN_DIR`` reads what ``selfprune search`` wrote there (``config.json``,
``journal.jsonl``, and when present ``best.json``, ``summary.json``, ``proposals.jsonl``, ``llm/*.jsonl``)
and writes ``report.md``, ``rates.png`` (per-layer rates of the best candidate vs uniform) and
``fitness.png`` (fitness over evaluations, per operator) to ``RUN_DIR/report`` or ``--out``.

Results measured afterwards are picked up when saved in the run folder under these names:

* ``ppl*.json``   -- ``selfprune ppl --out`` (e.g. ``ppl.json``, ``ppl_dense.json``): a perplexity table;
* ``eval*.json``  -- ``selfprune eval --out`` (e.g. ``eval.json``, ``eval_dense.json``): zero-shot accuracy,
  one column per file;
* ``speed*.json`` -- ``selfprune speed --out``: prefill/decode times, measured and ideal (FLOPs) ratios.
"""
from __future__ import annotations

import io
import json
import math
import statistics
from collections import Counter
from pathlib import Path

from ..errors import SelfpruneError
from ..io import atomic_write_bytes, atomic_write_text, read_jsonl

EXTRA_PATTERNS = {"ppl": "ppl*.json", "eval": "eval*.json", "speed": "speed*.json"}


# -- reading ---------------------------------------------------------------------------------------------
def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SelfpruneError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): fix or remove it") from None


def load_run(run_dir) -> dict:
    """Everything the report needs from a run folder; a folder that holds no run is a one-line error."""
    run = Path(run_dir)
    if not run.is_dir():
        raise SelfpruneError(f"{run} is not a folder: give the run directory that `selfprune search --out` wrote")
    missing = [name for name in ("config.json", "journal.jsonl") if not (run / name).is_file()]
    if missing:
        raise SelfpruneError(f"{run} is not a search run directory (no {' or '.join(missing)}) nor a recovery "
                             "folder (no recovery_run.json, no recovery in config.json): give the folder that "
                             "`selfprune search --out` or `selfprune recover --out` wrote")
    journal = read_jsonl(run / "journal.jsonl")
    if not journal:
        raise SelfpruneError(f"{run}/journal.jsonl holds no evaluation yet: report once the search has evaluated "
                             "a candidate")
    data = {
        "dir": run,
        "config": _read_json(run / "config.json"),
        "journal": journal,
        "summary": _read_json(run / "summary.json") if (run / "summary.json").is_file() else None,
        "best": _read_json(run / "best.json") if (run / "best.json").is_file() else None,
        "batches": read_jsonl(run / "proposals.jsonl"),
        "llm_calls": [c for f in sorted((run / "llm").glob("*.jsonl")) for c in read_jsonl(f)],
    }
    for kind, pattern in EXTRA_PATTERNS.items():
        data[kind] = {f.stem: _read_json(f) for f in sorted(run.glob(pattern)) if f.is_file()}
    return data


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def best_record(run: dict) -> dict:
    """The journal record of the best candidate (best.json's index when present, else the lowest fitness)."""
    journal = run["journal"]
    index = (run["best"] or {}).get("index")
    by_index = {r["index"]: r for r in journal}
    if index in by_index:
        return by_index[index]
    scored = [r for r in journal if _finite(r.get("fitness")) is not None]
    if not scored:
        raise SelfpruneError(f"{run['dir']}: no evaluation has a finite fitness: nothing to report as the best")
    return min(scored, key=lambda r: (r["fitness"], r["index"]))


def uniform_fitness(run: dict) -> float | None:
    if run["summary"] and run["summary"].get("uniform_fitness") is not None:
        return run["summary"]["uniform_fitness"]
    target = run["config"].get("target")
    for r in run["journal"]:
        if r.get("operator") in ("uniform", "seed:uniform") or (
                target is not None and all(abs(x - target) < 1e-9 for x in r["rates"])):
            return r.get("fitness")
    return None


# -- plots -----------------------------------------------------------------------------------------------
def _save_figure(fig, path: Path) -> None:
    """PNG through a temporary file and a rename, so a killed report never leaves a torn image."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=150, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot_rates(run: dict, best: dict, path: Path) -> None:
    """Bars: the best candidate's per-layer rates (requested), dots: achieved, dashed: uniform."""
    from matplotlib.figure import Figure  # Figure + savefig uses Agg and leaves pyplot's global state alone
    from matplotlib.ticker import MaxNLocator

    rates, achieved = best["rates"], best.get("achieved")
    layers = range(len(rates))
    fig = Figure(figsize=(max(6.0, 0.28 * len(rates) + 2), 3.4))
    ax = fig.subplots()
    ax.bar(layers, rates, color="#4C72B0", label=f"best (eval #{best['index']})")
    if achieved:
        ax.plot(layers, achieved, "o", color="#DD8452", markersize=3.5, label="achieved (whole heads/channels)")
    target = run["config"].get("target")
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"uniform {target:g}")
    for bound in run["config"].get("bounds") or []:
        ax.axhline(bound, color="grey", linestyle=":", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("pruning rate")
    ax.set_xlim(-0.6, len(rates) - 0.4)
    ax.set_title("Per-layer pruning rates")
    ax.legend(fontsize=8, loc="best")
    _save_figure(fig, path)


def plot_fitness(run: dict, path: Path) -> int:
    """Each operator's evaluations as a line over the evaluation index, with the running best; returns how
    many evaluations had no finite fitness (they cannot be drawn)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    journal = sorted(run["journal"], key=lambda r: r["index"])
    points = [(r["index"], _finite(r.get("fitness")), r.get("operator", "?")) for r in journal]
    drawn = [(i, f, op) for i, f, op in points if f is not None]
    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    for op in dict.fromkeys(op for _, _, op in drawn):
        xs, ys = zip(*[(i, f) for i, f, o in drawn if o == op])
        ax.plot(xs, ys, "o-", markersize=3, linewidth=0.7, alpha=0.8, label=op)
    best, steps = math.inf, []
    for i, f, _ in drawn:
        best = min(best, f)
        steps.append((i, best))
    if steps:
        ax.step(*zip(*steps), where="post", color="black", linewidth=1.6, label="best so far")
    values = [f for _, f, _ in drawn]
    if values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("evaluation")
    kind = (run["config"].get("fitness") or {}).get("kind", "fitness")
    ax.set_ylabel(f"fitness ({kind}, lower is better)")
    ax.set_title("Fitness over evaluations")
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    _save_figure(fig, path)
    return len(points) - len(drawn)


# -- tables ----------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _g(value, digits: int = 6) -> str:
    value = _finite(value)
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 10 ** digits else f"{value:.{digits}g}"  # no exponents in tables


def summary_section(run: dict, best: dict) -> str:
    config, summary, journal = run["config"], run["summary"] or {}, run["journal"]
    uniform = uniform_fitness(run)
    rows = [
        ["model", config.get("model")],
        ["operator", config.get("operator")],
        ["target (mean rate)", _g(config.get("target"))],
        ["evaluations", f"{len(journal)} of budget {config.get('budget', 'n/a')}"
                        + (f" ({summary['stop_reason']})" if summary.get("stop_reason") else " (run not finished)")],
        ["best fitness", f"{_g(best['fitness'])} (eval #{best['index']}, {best.get('operator')})"],
        ["uniform fitness", _g(uniform)],
    ]
    if uniform and _finite(best["fitness"]) is not None:
        rows.append(["best / uniform", f"{best['fitness'] / uniform:.4f}"])
    if summary:
        rows += [["wall time", f"{summary.get('wall_seconds', 0):.1f} s"],
                 ["seconds per evaluation", f"{summary.get('seconds_per_eval', 0):.3f}"],
                 ["cache hits (same model proposed again)", summary.get("cache_hits")],
                 ["repairs to the constraint", summary.get("repairs")]]
        if summary.get("evaluation"):  # where candidates were scored, sliced or masked, and the memory it took
            from ..search.runner import evaluation_cell

            rows.append(["candidates scored", evaluation_cell(summary["evaluation"])])
    rescore = summary.get("rescore")
    if rescore:
        rows.append(["re-scored on more tokens", f"top {rescore['top']}: best {_g(rescore['best_rescored_fitness'])} "
                                                 f"(cheap winner was eval #{rescore['cheapest_winner_index']})"])
    model = summary.get("model") or {}
    if model.get("path"):
        rows.append(["pruned model", f"`{model['path']}` (achieved rate {_g(model.get('achieved_rate'), 4)})"])
    recovered = summary.get("recovery") or {}  # selfprune.recovery.recover_search_model's facts
    if recovered.get("path"):
        loss = recovered.get("heldout_lm_loss") or {}
        rows.append(["recovered model", f"`{recovered['path']}`: held-out loss {_g(loss.get('before'))} -> "
                                         f"{_g(loss.get('after'))} nats/token after {recovered.get('tokens', 0):,} "
                                         f"tokens of {recovered.get('method')} "
                                         f"({_g(recovered.get('train_seconds'))} s)"])
    return _table(["", "value"], rows, "ll")


def layers_section(run: dict, best: dict) -> str:
    target = run["config"].get("target")
    achieved = best.get("achieved") or [None] * len(best["rates"])
    rows = [[i, f"{r:.4f}", "" if a is None else f"{a:.4f}", "" if target is None else f"{target:.4f}"]
            for i, (r, a) in enumerate(zip(best["rates"], achieved))]
    return _table(["layer", "best rate", "achieved", "uniform"], rows)


def operators_section(run: dict) -> str:
    """Per operator: how many evaluations, its best and median fitness, how often it improved the best."""
    stats: dict[str, dict] = {}
    best = math.inf
    for r in sorted(run["journal"], key=lambda r: r["index"]):
        s = stats.setdefault(r.get("operator", "?"), {"n": 0, "values": [], "improved": 0})
        s["n"] += 1
        f = _finite(r.get("fitness"))
        if f is not None:
            s["values"].append(f)
            if f < best:
                best, s["improved"] = f, s["improved"] + 1
    rows = [[op, s["n"], _g(min(s["values"], default=None)), _g(statistics.median(s["values"]) if s["values"] else None),
             s["improved"]] for op, s in stats.items()]
    return _table(["operator", "evaluations", "best fitness", "median fitness", "improved the best"], rows)


def llm_section(run: dict) -> str | None:
    """The LLM operator's validity counts: totals (summary, else per-batch counters) and per-call statuses."""
    totals = dict((run["summary"] or {}).get("llm") or {})
    if not totals.get("calls"):
        totals = Counter()
        for batch in run["batches"]:
            totals.update({k: v for k, v in (batch.get("llm") or {}).items() if isinstance(v, (int, float))})
    if "duplicate" in totals:  # summaries written before the counter got its reported name
        totals["duplicates"] = totals.get("duplicates", 0) + totals.pop("duplicate")
    calls = run["llm_calls"]
    if not totals.get("calls") and not calls:
        return None
    parts = []
    if totals.get("calls"):
        order = ["calls", "valid", "repaired", "unusable", "duplicates", "fallbacks", "select_valid", "select_repaired",
                 "select_unusable", "select_fallbacks", "prompt_tokens", "completion_tokens", "seconds"]
        keys = [k for k in order if k in totals] + sorted(k for k in totals if k not in order)
        parts.append(_table(["counter", "count"], [[k, _g(totals[k]) if k == "seconds" else totals[k]] for k in keys]))
    sources = (run["summary"] or {}).get("sources")
    if sources:  # the LLM's own candidates (replies) apart from the numeric fallback's
        parts.append("Evaluated candidates by where they came from (`reply`: the operator's replies; `fallback`: "
                     "the numeric operator, filling in for unusable replies):\n\n"
                     + _table(["source", "evaluations", "best fitness", "best eval #"],
                              [[k, v.get("evaluations"), _g(v.get("best_fitness")), v.get("best_index")]
                               for k, v in sources.items()]))
    if calls:
        statuses = sorted({c.get("status", "?") for c in calls})
        by_op: dict[str, Counter] = {}
        for c in calls:
            by_op.setdefault(c.get("operator", "?"), Counter())[c.get("status", "?")] += 1
        rows = [[op, *[counts.get(s, 0) for s in statuses], sum(counts.values())] for op, counts in by_op.items()]
        parts.append("Logged calls (`llm/*.jsonl`), one per attempt:\n\n"
                     + _table(["LLM operation", *statuses, "total"], rows))
    return "\n\n".join(parts)


def ppl_section(results: dict) -> str:
    rows = []
    for name, r in results.items():
        rows.append([f"`{name}.json`", r.get("model", ""), f"{r.get('dataset', '?')}/{r.get('split', '?')}",
                     r.get("seq_len", ""), r.get("predicted_tokens", r.get("tokens", "")), _g(r.get("ppl"), 5)])
    return _table(["file", "model", "data", "seq-len", "tokens", "perplexity"], rows, "lllrrr")


def eval_section(results: dict) -> str:
    names = list(results)
    tasks = list(dict.fromkeys(t for r in results.values() for t in (r.get("tasks") or {})))
    rows = []
    for task in tasks:
        metric = next((r["tasks"][task].get("metric") for r in results.values() if task in r.get("tasks", {})), "")
        rows.append([task, metric, *[_g((r.get("tasks") or {}).get(task, {}).get("value"), 4) for r in results.values()]])
    rows.append(["**average**", "", *[_g(r.get("average"), 4) for r in results.values()]])
    header = ["task", "metric", *[f"{n} ({results[n].get('model', '?')})" for n in names]]
    limits = {n: r.get("limit") for n, r in results.items()}
    note = "; ".join(f"`{n}`: {'first ' + str(l) + ' items per task' if l else 'full sets'}" for n, l in limits.items())
    return _table(header, rows, "ll" + "r" * len(names)) + f"\n\nItems: {note}."


def speed_section(results: dict) -> str:
    parts = []
    for name, r in results.items():
        rows = [["parameters", f"{r['models']['dense']['parameters']:,}", f"{r['models']['pruned']['parameters']:,}",
                 f"{r['parameter_ratio']:.3f}", ""]]
        for p in r.get("prefill", []):
            rows.append([f"prefill {p['batch_size']}x{p['seq_len']} (ms)", f"{1000 * p['dense']['median_s']:.2f}",
                         f"{1000 * p['pruned']['median_s']:.2f}", f"{p['time_ratio']:.3f}", f"{p['ideal_ratio']:.3f}"])
        d = r.get("decode")
        if d:
            rows.append([f"decode ms/token ({d['prompt_len']}+{d['new_tokens']})", f"{d['dense']['ms_per_token']:.2f}",
                         f"{d['pruned']['ms_per_token']:.2f}", f"{d['time_ratio']:.3f}", f"{d['ideal_ratio']:.3f}"])
        m = r.get("memory")
        if m:
            rows.append(["peak memory (MB)", f"{m['dense']['peak_bytes'] / 1e6:.1f}", f"{m['pruned']['peak_bytes'] / 1e6:.1f}",
                         f"{m['peak_ratio']:.3f}", ""])
        where = (f"{r.get('device')} ({r.get('device_name', '')}), torch {r.get('torch')}, {r.get('threads')} threads, "
                 f"median of {r.get('repeats')} after {r.get('warmup')} warm-up runs, dense and pruned interleaved")
        parts.append(f"`{name}.json`: {where}.\n\n"
                     + _table(["", "dense", "pruned", "pruned/dense", "ideal (FLOPs)"], rows))
    return "\n\n".join(parts)


# -- the report --------------------------------------------------------------------------------------------
def build_report(run_dir, out_dir=None) -> Path:
    """Write ``report.md``, ``rates.png`` and ``fitness.png`` for the run in ``run_dir``; returns report.md.
    A recovery folder gets its own report (``report.md``, ``loss.png``) instead."""
    from .recovery_report import build_recovery_report, is_recovery_folder

    if is_recovery_folder(run_dir):
        return build_recovery_report(run_dir, out_dir)
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run["dir"] / "report"
    if out.exists() and not out.is_dir():
        raise SelfpruneError(f"--out {out} exists and is not a folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    best = best_record(run)
    plot_rates(run, best, out / "rates.png")
    unplotted = plot_fitness(run, out / "fitness.png")
    config = run["config"]
    sections = [
        f"# Search report: `{run['dir'].name}`",
        f"Run folder `{run['dir']}`; {config.get('operator', '?')} search pruning {config.get('model', '?')} "
        f"to a mean rate of {_g(config.get('target'))}, scored by "
        f"{_describe_fitness(config.get('fitness'))}. Lower fitness is better.",
        "## Summary", summary_section(run, best),
        "## Per-layer rates of the best candidate",
        "![per-layer rates](rates.png)",
        "Requested rates of the best candidate, the fractions achieved after rounding to whole heads and MLP "
        "channels, and the uniform rate every layer would get.",
        layers_section(run, best),
        "## Fitness over evaluations",
        "![fitness over evaluations](fitness.png)"
        + (f"\n\n{unplotted} evaluation(s) without a finite fitness are not drawn." if unplotted else ""),
        operators_section(run),
    ]
    llm = llm_section(run)
    sections += ["## LLM operator", llm if llm else "This run used no LLM operator (no LLM calls recorded)."]
    extras = [("ppl", "Perplexity", ppl_section), ("eval", "Zero-shot accuracy", eval_section),
              ("speed", "Speed", speed_section)]
    for kind, title, render in extras:
        sections.append(f"## {title}")
        if run[kind]:
            sections.append(render(run[kind]))
        else:
            sections.append(f"No `{EXTRA_PATTERNS[kind]}` in the run folder "
                            f"(run `selfprune {kind} ... --out {run['dir'] / (kind + '.json')}` to include it).")
    sections += ["## Settings", "The run's `config.json`, verbatim:",
                 "```json\n" + json.dumps(config, indent=2) + "\n```"]
    report = out / "report.md"
    atomic_write_text(report, "\n\n".join(sections) + "\n")
    return report


def _describe_fitness(fitness: dict | None) -> str:
    if not fitness:
        return "its fitness"
    kind = {"ppl": "perplexity", "kl": "KL divergence to the dense model"}.get(fitness.get("kind"), fitness.get("kind"))
    return (f"{kind} on {fitness.get('dataset', '?')}/{fitness.get('split', '?')} "
            f"({fitness.get('windows', '?')} windows of {fitness.get('seq_len', '?')} tokens)")
