"""Issue 14 part 1: does the search's fitness rank candidates the way the reported test perplexity does?

For candidates at 20% and 50% (uniform, OWL at several lambdas, the search runs' bests from results/search*.json,
random allocations and neighbours of those bests), one pass per candidate computes, *per window*:

* WikiText-2 validation NLL on 64 windows of 128 tokens (fitness ``ppl`` on the first 6 / 16 / 32 / 64 windows),
* KL(dense || pruned) on 64 windows of 128 of the C4 sample (fitness ``kl`` at the same token counts),
* WikiText-2 validation NLL on 16 windows of 512 (seq-len 512 at 2 / 4 / 8 / 16 windows: 1k-8k tokens),
* WikiText-2 *test* NLL on 80 windows of 128 (the number every table reports; never part of a fitness).

Each fitness setting is then compared with test perplexity: Spearman correlation over the candidates of a rate,
the test perplexity of the candidate the setting would pick (regret vs the best candidate on test), and its cost
per evaluation (tokens, seconds measured here). Staged selection (EvoPress: all candidates on few windows, the best
quarter again on more) is evaluated from the same per-window numbers.

Candidates are journaled one per line, per-window numbers included, in ``results/fitness_candidates.jsonl``: it is
committed with the results, so a killed run continues on any machine and the analysis can be redone from it. The
result files are rewritten after every candidate.

    nice python bench/bench_fitness.py [--candidates 40] [--targets 0.2,0.5] [--threads 2]

The candidate list grows as search results are added (every run's best and its neighbours), so a later run with the
same ``--candidates`` adds the candidates of the current list not yet journaled (matched by the pruned shapes they
build). The committed journal: ``--candidates 40`` at 50% and ``--candidates 60`` at 20% (stopped after 38), then,
after the ``v3`` LLM runs, ``--targets 0.2 --candidates 44`` and ``--targets 0.5 --candidates 33``, then
``--targets 0.2 --candidates 100`` and ``--targets 0.5 --candidates 100`` (``--threads 1``, the two rates in two
processes side by side: each rewrites the result files from its own records, so ``--analyse-only`` after both).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import DATA_DIR, RESULTS, versions

from selfprune.calibration import CalibrationConfig
from selfprune.data import load_text, token_windows
from selfprune.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from selfprune.models import load_model
from selfprune.pruning import Pruner
from selfprune.search.operators import mutate_move, owl_rates, random_rates
from selfprune.search.space import DEFAULT_BOUNDS, SearchSpace

NAME = "fitness"
JOURNAL = RESULTS / f"{NAME}_candidates.jsonl"
# (label, dataset, seq_len, windows): the passes made per candidate
PASSES = (("wt2-val-128", "wikitext2", "validation", 128, 64),
          ("c4-val-128", "c4", "validation", 128, 64),
          ("wt2-val-512", "wikitext2", "validation", 512, 16),
          ("wt2-test-128", "wikitext2", "test", 128, 80))
SETTINGS = ([("ppl", "wt2-val-128", k) for k in (6, 16, 32, 64)]
            + [("kl", "c4-val-128", k) for k in (6, 16, 32, 64)]
            + [("ppl", "wt2-val-512", k) for k in (2, 4, 8, 16)])
# (fitness, data, few windows, many windows): every candidate on the few, the best quarter again on the many
STAGED = (("ppl", "wt2-val-128", 6, 32), ("ppl", "wt2-val-128", 16, 64), ("kl", "c4-val-128", 6, 32),
          ("kl", "c4-val-128", 16, 64), ("ppl", "wt2-val-512", 2, 8), ("ppl", "wt2-val-512", 4, 16))
OWL_LAMBDAS = (0.02, 0.05, 0.08, 0.12, 0.16, 0.2)
BATCH = 8
# Uncertainty of the study itself: resamples of the candidates (for the Spearman interval) and random draws of which
# windows a fitness uses (for how often a setting's pick is the best candidate); seeded, so the tables are reproducible.
BOOTSTRAP, WINDOW_DRAWS, SEED = 1000, 200, 0


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # ties share their mean rank
            tied = x == value
            r[tied] = r[tied].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1]) if len(ra) > 2 else float("nan")


def spearman_interval(a, b, rng, resamples: int = BOOTSTRAP) -> list[float]:
    """95% percentile bootstrap interval of Spearman's rho over the candidates: how far the study's own choice of
    candidates moves the correlation."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    draws = [spearman(a[i], b[i]) for i in (rng.integers(0, len(a), len(a)) for _ in range(resamples))]
    return [float(q) for q in np.nanpercentile(draws, [2.5, 97.5])]


def survivors(count: int) -> int:
    """How many candidates staged selection scores again: the best quarter."""
    return max(1, count // 4)


def select(per_window: np.ndarray, idx: np.ndarray, few: int | None = None) -> int:
    """The candidate (row) a fitness picks: lowest mean over the windows ``idx`` (ppl and KL alike, as perplexity
    is monotone in the mean NLL). With ``few``, staged: all on ``idx[:few]``, the best quarter again on all of
    ``idx``."""
    if few is None:
        return int(np.argmin(per_window[:, idx].mean(1)))
    keep = np.argsort(per_window[:, idx[:few]].mean(1), kind="stable")[: survivors(len(per_window))]
    return int(keep[np.argmin(per_window[keep][:, idx].mean(1))])


def window_draws(per_window: np.ndarray, test: np.ndarray, k: int, rng, few: int | None = None,
                 draws: int = WINDOW_DRAWS) -> dict | None:
    """Pick the candidate with the lowest mean over ``k`` windows drawn at random (without replacement) from the
    pass, ``draws`` times: the share of draws whose pick is the best candidate on test, and the mean regret. A fixed
    window set is one draw of many; this says whether a setting's pick is robust or luck. With ``few``, staged
    selection: all candidates on the first ``few`` of the drawn windows, the best quarter on all ``k``. None where
    ``k`` is every window of the pass and nothing else varies (no other draw exists)."""
    total = per_window.shape[1]
    if k >= total and few is None:
        return None
    regrets = np.array([test[select(per_window, rng.choice(total, size=k, replace=False), few)] - test.min()
                        for _ in range(draws)])
    return {"draws": draws, "picks_best": float(np.mean(regrets == 0)), "mean_regret": float(regrets.mean())}


def candidates(space: SearchSpace, pruner: Pruner, target: float, count: int) -> list[dict]:
    """Uniform, OWL sweep, every search run's best at ``target``, then random allocations and neighbours of the
    search bests up to ``count``."""
    out = [{"source": "uniform", "rates": space.uniform()}]
    ratios = pruner.outlier_ratios()
    out += [{"source": f"owl:{lam:g}", "rates": owl_rates(space, ratios, lam)} for lam in OWL_LAMBDAS]
    for path in sorted(RESULTS.glob("search*.json")):
        for row in json.loads(path.read_text())["rows"]:
            if row["target"] == target and row["operator"] != "uniform" and row.get("gqa_policy", "group") == "group":
                out.append({"source": f"search:{path.stem}:{row['operator']}", "rates": row["best_rates"]})
    # Then, alternately, a random allocation and a neighbour of a search best (a few budget-preserving moves, as a
    # search's late offspring): random ones spread the test range, neighbours are the near-best candidates whose
    # order decides what a search returns.
    bests = [cand for cand in out if cand["source"].startswith("search:")]
    rng, near_rng = np.random.default_rng(int(target * 1000)), np.random.default_rng(int(target * 1000) + 1)
    for i in range(2 * count):  # twice as many as needed: some may repeat a shape
        if bests and i % 2:
            parent = bests[(i // 2) % len(bests)]
            out.append({"source": "near:" + parent["source"].removeprefix("search:"),
                        "rates": mutate_move(parent["rates"], space, near_rng, step=0.05, max_moves=5)})
        else:
            out.append({"source": "random", "rates": random_rates(space, rng)})
    seen, unique = set(), []
    for cand in out:  # one model per per-layer shape
        key = shape_key(pruner, cand["rates"])
        if key not in seen:
            seen.add(key)
            unique.append(cand | {"rates": [float(r) for r in cand["rates"]]})
    return unique[:count]


def shape_key(pruner: Pruner, rates) -> tuple:
    """What identifies a candidate: the per-layer shapes it builds (OWL rates computed with another thread count
    differ in the last bit and build the same model)."""
    return tuple((p.num_heads, p.num_kv_heads, p.width) for p in pruner.plan(rates))


class Passes:
    """The token windows of every pass and the dense model's log-probabilities for the KL pass."""

    def __init__(self, model, tokenizer):
        self.windows = {}
        for label, dataset, split, seq_len, count in PASSES:
            self.windows[label] = token_windows(tokenizer, load_text(dataset, split, DATA_DIR), seq_len, count)
        self.dense_logprobs = [lp for lp, _ in self._forward(model, "c4-val-128", keep=True)]

    @torch.no_grad()
    def _forward(self, model, label, keep=False):
        ids_all = self.windows[label]
        for i in range(0, ids_all.shape[0], BATCH):
            ids = ids_all[i : i + BATCH]
            logits = model(ids, use_cache=False).logits[:, :-1].float()
            logprobs = F.log_softmax(logits, -1)
            yield (logprobs.to(torch.float16) if keep else logprobs), ids

    @torch.no_grad()
    def score(self, model) -> dict:
        """Per-window NLL (nats/token) of each pass, per-window KL on the C4 pass, and seconds per pass."""
        out = {}
        for label, *_ in PASSES:
            start = time.perf_counter()
            values = []
            batches = self._forward(model, label)
            for b, (logprobs, ids) in enumerate(batches):
                if label == "c4-val-128":
                    dense = self.dense_logprobs[b].float()
                    values += (dense.exp() * (dense - logprobs)).sum(-1).mean(-1).tolist()
                else:
                    nll = -logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
                    values += nll.mean(-1).tolist()
            out[label] = {"per_window": values, "seconds": time.perf_counter() - start}
        return out


def analyse(records: list[dict]) -> dict:
    """Correlation, regret and cost of every fitness setting (and staged selection) per target."""
    by_target: dict = {}
    for rec in records:
        by_target.setdefault(rec["target"], []).append(rec)
    analysis = {}
    for target, recs in sorted(by_target.items()):
        test = np.array([math.exp(np.mean(r["passes"]["wt2-test-128"]["per_window"])) for r in recs])
        best_test = float(test.min())
        # Ranking the good candidates is what decides a search's pick; a wide test range makes any fitness
        # correlate overall, so the correlation is also reported over the better half by test perplexity.
        top = test <= np.median(test)
        rows = []
        rng = np.random.default_rng(SEED)
        matrices = {label: np.array([r["passes"][label]["per_window"] for r in recs]) for label, *_ in PASSES}

        def value(rec, kind, label, k):
            windows = rec["passes"][label]["per_window"][:k]
            return math.exp(np.mean(windows)) if kind == "ppl" else float(np.mean(windows))

        def cost(label, k):
            seconds = np.mean([r["passes"][label]["seconds"] / len(r["passes"][label]["per_window"]) for r in recs])
            seq_len = next(p[3] for p in PASSES if p[0] == label)
            return k * seq_len, float(seconds * k)

        for kind, label, k in SETTINGS:
            scores = np.array([value(r, kind, label, k) for r in recs])
            pick = int(np.argmin(scores))
            tokens, seconds = cost(label, k)
            rows.append({"fitness": kind, "data": label, "windows": k, "tokens": tokens, "seconds_per_eval": seconds,
                         "spearman": spearman(scores, test), "spearman_best_half": spearman(scores[top], test[top]),
                         "spearman_best_half_ci95": spearman_interval(scores[top], test[top], rng),
                         "picked_test_ppl": float(test[pick]), "regret": float(test[pick] - best_test),
                         "window_draws": window_draws(matrices[label], test, k, rng)})
        for kind, label, few, many in STAGED:
            pick = select(matrices[label], np.arange(many), few)
            t_few, s_few = cost(label, few)
            t_many, s_many = cost(label, many)
            n, kept = len(recs), survivors(len(recs))
            rows.append({"fitness": f"{kind} staged", "data": label, "windows": f"{few} -> {many} (top {kept})",
                         "tokens": t_few + t_many * kept / n, "seconds_per_eval": s_few + s_many * kept / n,
                         "spearman": None, "spearman_best_half": None, "picked_test_ppl": float(test[pick]),
                         "regret": float(test[pick] - best_test),
                         "window_draws": window_draws(matrices[label], test, many, rng, few=few)})
        analysis[str(target)] = {"candidates": len(recs), "best_half": int(top.sum()), "best_test_ppl": best_test,
                                 "test_ppl_range": [float(test.min()), float(test.max())], "settings": rows}
    return analysis


def table(data: dict) -> str:
    lines = ["# Fitness fidelity: which search fitness ranks candidates like the test perplexity", "",
             "Generated by `bench/bench_fitness.py` from `fitness.json`. SmolLM2-135M, FLAP (C4 64 x 128 seed 0), "
             "GQA policy group. Candidates per rate: uniform, OWL (lambda 0.02-0.2), the search runs' bests, then "
             "random allocations alternating with neighbours of the search bests (up to 5 budget-preserving moves of "
             "0.05), one per pruned shape; `fitness_candidates.jsonl` holds every candidate's per-window numbers. "
             "Test: WikiText-2 test, 80 windows of 128. Spearman: rank correlation of the fitness with test "
             "perplexity over the candidates (1 = same order); best half: the same over the candidates whose test "
             "perplexity is at most the median (the near-best ones a search must tell apart; a wide test range makes "
             "every fitness correlate overall). Regret: test perplexity of the candidate the fitness picks minus the "
             "best test perplexity among the candidates. 95% CI: percentile bootstrap over the candidates "
             f"({BOOTSTRAP} resamples). Window draws: the same selection on {WINDOW_DRAWS} random draws of which "
             "windows of the pass a fitness uses (the committed pick uses the first ones): the share of draws whose "
             "pick is the best candidate and the mean regret; none where a setting uses every window of its pass. "
             "Staged: every candidate on the few windows, the best quarter again on more (EvoPress); its cost is per "
             "candidate on average. Seconds are CPU forward time per evaluation measured here (shared 2-core CPU).", ""]
    for target, entry in data["analysis"].items():
        half = f" ({entry['best_half']} in the best half)" if "best_half" in entry else ""
        lines += [f"## {float(target):.0%}: {entry['candidates']} candidates{half}, test ppl "
                  f"{entry['test_ppl_range'][0]:.2f}-{entry['test_ppl_range'][1]:.2f}", "",
                  "| fitness | data | windows | tokens / eval | s / eval | Spearman vs test | Spearman, best half "
                  "[95% CI] | picked: test ppl | regret | window draws: picks best | window draws: mean regret |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in entry["settings"]:
            rho = "" if row["spearman"] is None else f"{row['spearman']:.3f}"
            half = "" if row.get("spearman_best_half") is None else f"{row['spearman_best_half']:.3f}"
            if row.get("spearman_best_half_ci95"):
                half += " [{:.2f}, {:.2f}]".format(*row["spearman_best_half_ci95"])
            draws = row.get("window_draws") or {}
            share = f"{draws['picks_best']:.0%}" if draws else ""
            mean_regret = f"{draws['mean_regret']:.2f}" if draws else ""
            lines.append(f"| {row['fitness']} | {row['data']} | {row['windows']} | {row['tokens']:,.0f} | "
                         f"{row['seconds_per_eval']:.2f} | {rho} | {half} | {row['picked_test_ppl']:.2f} | "
                         f"{row['regret']:.2f} | {share} | {mean_regret} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=40, help="candidates per target")
    parser.add_argument("--targets", default="0.2,0.5")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--analyse-only", action="store_true", help="rewrite the results from the journal")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    done = read_jsonl(JOURNAL)
    if not args.analyse_only:
        model, tokenizer = load_model("default")
        pruner = Pruner(model, tokenizer, "flap", CalibrationConfig(num_samples=64, seq_len=128, seed=0,
                                                                   data_dir=DATA_DIR), progress=False)
        passes = Passes(model, tokenizer)
        for target in (float(t) for t in args.targets.split(",")):
            space = SearchSpace(pruner.layer_params, target, DEFAULT_BOUNDS)
            have = {shape_key(pruner, r["rates"]) for r in done if r["target"] == target}
            for i, cand in enumerate(candidates(space, pruner, target, args.candidates)):
                if shape_key(pruner, cand["rates"]) in have:
                    continue
                pruned, report = pruner.build(cand["rates"])
                record = {"target": target, **cand, "achieved_rate": report.achieved_rate,
                          "passes": passes.score(pruned)}
                append_jsonl(JOURNAL, record)
                done.append(record)
                test = math.exp(np.mean(record["passes"]["wt2-test-128"]["per_window"]))
                print(f"{target:.0%} #{i} {cand['source']}: test ppl {test:.2f}", flush=True)
                write(done)
    write(done)


def write(records: list[dict]) -> None:
    if not records:
        return
    data = {"settings": {"model": "default (SmolLM2-135M-Instruct)", "criterion": "flap", "gqa_policy": "group",
                         "calibration": {"source": "c4", "num_samples": 64, "seq_len": 128, "seed": 0},
                         "passes": [dict(zip(("label", "dataset", "split", "seq_len", "windows"), p)) for p in PASSES],
                         "versions": versions()},
            "analysis": analyse(records)}
    atomic_write_json(RESULTS / f"{NAME}.json", data)
    atomic_write_text(RESULTS / f"{NAME}.md", table(data) + "\n")


if __name__ == "__main__":
    main()
