"""Candidate fitness: build the pruned model from cached scores and score it on a non-test split.

``ppl`` is the pruned model's perplexity on the validation windows; ``kl`` is the mean KL divergence from
the dense model's next-token distribution on the same windows (EvoPress found it a steadier signal on few
tokens). Dense log-probabilities for ``kl`` are computed once and kept in float16.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..errors import SelfpruneError, option
from ..perplexity import PerplexityEvaluator

FITNESS_KINDS = ("ppl", "kl")


class Fitness:
    """Callable ``rates -> {"fitness", "tokens", "seconds", "forward_seconds", ...}``; lower is better."""

    def __init__(self, pruner, evaluator: PerplexityEvaluator, kind: str = "ppl",
                 dense_logprobs: list[torch.Tensor] | None = None):
        if kind not in FITNESS_KINDS:
            raise SelfpruneError(f"unknown fitness {kind!r}: use one of {', '.join(FITNESS_KINDS)}")
        self.pruner, self.evaluator, self.kind = pruner, evaluator, kind
        self.settings = {"kind": kind, **evaluator.settings}
        if kind == "kl" and dense_logprobs is None:
            dense_logprobs = self._dense_reference()
        self._dense_logprobs = dense_logprobs

    def data(self) -> dict:
        """What another process needs to score candidates exactly as this one does (the token windows and,
        for ``kl``, the dense model's log-probabilities), without the data files or a second dense pass."""
        return {"kind": self.kind, "evaluator": self.evaluator, "dense_logprobs": self._dense_logprobs}

    @classmethod
    def from_data(cls, pruner, data: dict) -> "Fitness":
        return cls(pruner, data["evaluator"], data["kind"], data["dense_logprobs"])

    @torch.no_grad()
    def _dense_reference(self) -> list[torch.Tensor]:
        model = self.pruner.model
        device = next(model.parameters()).device
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
        device = next(model.parameters()).device
        total, start = 0.0, time.perf_counter()
        for ids, dense in zip(self._batches(), self._dense_logprobs):
            logits = model(ids.to(device), use_cache=False).logits[:, :-1].float()
            pruned = F.log_softmax(logits, -1)
            dense = dense.to(device=device, dtype=torch.float32)
            total += (dense.exp() * (dense - pruned)).sum().item()
        tokens = self.evaluator.predicted_tokens
        return {"kl": total / tokens, "tokens": tokens, "seconds": time.perf_counter() - start}

    def __call__(self, rates) -> dict:
        start = time.perf_counter()
        model, report = self.pruner.build(rates)
        if self.kind == "ppl":
            scored = self.evaluator(model)
            value = scored["ppl"]
        else:
            scored = self._kl(model)
            value = scored["kl"]
        total = time.perf_counter() - start
        if not math.isfinite(value):
            value = float("inf")
        return {"fitness": value, "tokens": scored["tokens"], "seconds": total,
                "forward_seconds": scored["seconds"], "achieved_rate": report.achieved_rate}


def layer_shapes(pruner, rates) -> tuple:
    """The pruned model ``rates`` give, as per-layer (query heads, KV heads, MLP width): the search's cache key.

    The kept heads and channels follow from these counts (the Pruner keeps the best-scored ones of its one
    calibration), so equal shapes are the same model; equal achieved fractions are not (a query head can
    weigh as much as a whole number of MLP channels).
    """
    return tuple((plan.num_heads, plan.num_kv_heads, plan.width) for plan in pruner.plan(rates))


def make_fitness(pruner, kind: str = "ppl", dataset: str = "wikitext2", split: str = "validation",
                 seq_len: int = 128, max_windows: int | None = 16, batch_size: int = 8, data_dir=None) -> Fitness:
    """The search's fitness on ``dataset``/``split``; the test split is refused so results are never leaked."""
    if split == "test":
        raise SelfpruneError(f"the search's fitness must not use the test split: pass {option('split')} validation")
    if pruner.tokenizer is None:
        raise SelfpruneError("the fitness needs the tokenizer: build the Pruner with it")
    evaluator = PerplexityEvaluator(pruner.tokenizer, dataset, split, seq_len, max_windows, batch_size, data_dir)
    return Fitness(pruner, evaluator, kind)
