"""Candidate fitness: build the pruned model from cached scores and score it on a non-test split.

``ppl`` is the pruned model's perplexity on the validation windows; ``kl`` is the mean KL divergence from
the dense model's next-token distribution on the same windows (EvoPress found it a steadier signal on few
tokens). Dense log-probabilities for ``kl`` are computed once and kept in float16.

``candidates`` says how a candidate is evaluated: ``sliced`` builds a physically pruned copy (fast, costs the
kept weights' memory again); ``masked`` runs the dense weights with the removed heads and channels masked
(``selfprune.masking``: no copy, dense compute) for models that barely fit. Both give the same fitness.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..errors import SelfpruneError, option
from ..offload import input_device
from ..masking import masked_candidate
from ..evaluation.perplexity import PerplexityEvaluator
from .defaults import DEFAULT_FITNESS_SEQ_LEN, DEFAULT_FITNESS_WINDOWS

FITNESS_KINDS = ("ppl", "kl")
CANDIDATE_MODES = ("sliced", "masked")


def check_candidates(candidates: str) -> str:
    if candidates not in CANDIDATE_MODES:
        raise SelfpruneError(f"unknown {option('candidates', '--candidates')} {candidates!r}: use one of "
                             f"{', '.join(CANDIDATE_MODES)} (masked evaluates on the dense weights, for models that "
                             "barely fit)")
    return candidates


class Fitness:
    """Callable ``rates -> {"fitness", "tokens", "seconds", "forward_seconds", ...}``; lower is better."""

    def __init__(self, pruner, evaluator: PerplexityEvaluator, kind: str = "ppl",
                 dense_logprobs: list[torch.Tensor] | None = None, candidates: str = "sliced"):
        if kind not in FITNESS_KINDS:
            raise SelfpruneError(f"unknown fitness {kind!r}: use one of {', '.join(FITNESS_KINDS)}")
        self.candidates = check_candidates(candidates)
        self.pruner, self.evaluator, self.kind = pruner, evaluator, kind
        self.settings = {"kind": kind, "candidates": candidates, **evaluator.settings}
        if kind == "kl" and dense_logprobs is None:
            dense_logprobs = self._dense_reference()
        self._dense_logprobs = dense_logprobs

    def data(self) -> dict:
        """What another process needs to score candidates exactly as this one does (the token windows and,
        for ``kl``, the dense model's log-probabilities), without the data files or a second dense pass."""
        return {"kind": self.kind, "evaluator": self.evaluator, "dense_logprobs": self._dense_logprobs,
                "candidates": self.candidates}

    @classmethod
    def from_data(cls, pruner, data: dict, candidates: str | None = None) -> "Fitness":
        """``candidates`` overrides the mode recorded in ``data`` (a worker short of memory can mask while
        the driver slices: the fitness is the same)."""
        return cls(pruner, data["evaluator"], data["kind"], data["dense_logprobs"],
                   candidates or data.get("candidates", "sliced"))

    @torch.no_grad()
    def _dense_reference(self) -> list[torch.Tensor]:
        model = self.pruner.model
        device = input_device(model)
        out = []
        for ids in self._batches():
            logits = model(ids.to(device), use_cache=False).logits[:, :-1].float()
            out.append(F.log_softmax(logits, -1).to(torch.float16).cpu())
        return out

    def _batches(self):
        windows, size = self.evaluator.windows, self.evaluator.batch_size
        return [windows[i : i + size] for i in range(0, windows.shape[0], size)]

    @torch.no_grad()
    def _kl(self, model) -> dict:
        device = input_device(model)
        total, start = 0.0, time.perf_counter()
        for ids, dense in zip(self._batches(), self._dense_logprobs):
            logits = model(ids.to(device), use_cache=False).logits[:, :-1].float()
            pruned = F.log_softmax(logits, -1)
            dense = dense.to(device=device, dtype=torch.float32)
            total += (dense.exp() * (dense - pruned)).sum().item()
        tokens = self.evaluator.predicted_tokens
        return {"kl": total / tokens, "tokens": tokens, "seconds": time.perf_counter() - start}

    def __call__(self, rates) -> dict:
        start, refit_before = time.perf_counter(), getattr(self.pruner, "refit_seconds", 0.0)
        if self.candidates == "masked":
            candidate = masked_candidate(self.pruner, rates)
            with candidate as model:
                scored = self._score(model)
            achieved_rate = candidate.achieved_rate
        else:
            model, report = self.pruner.build(rates)
            scored = self._score(model)
            achieved_rate = report.achieved_rate
            del model   # the sliced copy goes before the next candidate is built
        value = scored["ppl"] if self.kind == "ppl" else scored["kl"]
        total = time.perf_counter() - start
        if not math.isfinite(value):
            value = float("inf")
        result = {"fitness": value, "tokens": scored["tokens"], "seconds": total,
                  "forward_seconds": scored["seconds"], "achieved_rate": achieved_rate}
        if getattr(self.pruner, "reconstruct", "bias") == "lstsq":
            result["refit_seconds"] = self.pruner.refit_seconds - refit_before
        return result

    def _score(self, model) -> dict:
        return self.evaluator(model) if self.kind == "ppl" else self._kl(model)


def layer_shapes(pruner, rates) -> tuple:
    """The pruned model ``rates`` give, as per-layer (query heads, KV heads, MLP width): the search's cache key.

    The kept heads and channels follow from these counts (the Pruner keeps the best-scored ones of its one
    calibration), so equal shapes are the same model; equal achieved fractions are not (a query head can
    weigh as much as a whole number of MLP channels).
    """
    return tuple((plan.num_heads, plan.num_kv_heads, plan.width) for plan in pruner.plan(rates))


def make_fitness(pruner, kind: str = "ppl", dataset: str = "wikitext2", split: str = "validation",
                 seq_len: int = DEFAULT_FITNESS_SEQ_LEN, max_windows: int | None = DEFAULT_FITNESS_WINDOWS,
                 batch_size: int = 8, data_dir=None, candidates: str = "sliced") -> Fitness:
    """The search's fitness on ``dataset``/``split``; the test split is refused so results are never leaked."""
    check_candidates(candidates)   # before the data is read
    if split == "test":
        raise SelfpruneError(f"the search's fitness must not use the test split: pass {option('split')} validation")
    if pruner.tokenizer is None:
        raise SelfpruneError("the fitness needs the tokenizer: build the Pruner with it")
    evaluator = PerplexityEvaluator(pruner.tokenizer, dataset, split, seq_len, max_windows, batch_size, data_dir)
    return Fitness(pruner, evaluator, kind, candidates=candidates)
