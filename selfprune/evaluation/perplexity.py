"""Perplexity over non-overlapping windows, the way FLAP and LLM-Pruner report it (seq-len 128 by default).

Every result records the model, dataset, split, sequence length, number of windows and tokens, so numbers
from different settings are never compared by accident.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..data import bos_token_id, load_text, token_windows


class PerplexityEvaluator:
    """Tokenizes the text once; calling it on a model returns perplexity on the same windows every time."""

    def __init__(self, tokenizer, dataset: str = "wikitext2", split: str = "test", seq_len: int = 128,
                 max_windows: int | None = None, batch_size: int = 8, data_dir=None, progress: bool = False):
        if seq_len < 2:
            from ..errors import SelfpruneError, option

            raise SelfpruneError(f"{option('seq_len')} {seq_len} is too short: use at least 2 (128 or 2048 are standard)")
        self.source = load_text(dataset, split, data_dir)
        self.windows = token_windows(tokenizer, self.source, seq_len, max_windows)
        self.bos_per_window = bos_token_id(tokenizer) is not None
        self.seq_len, self.batch_size, self.progress = seq_len, batch_size, progress

    @property
    def settings(self) -> dict:
        return {"dataset": self.source.name, "split": self.source.split, "origin": self.source.origin,
                "seq_len": self.seq_len, "windows": int(self.windows.shape[0]),
                "tokens": int(self.windows.numel()), "predicted_tokens": self.predicted_tokens,
                "bos_per_window": self.bos_per_window}

    @property
    def predicted_tokens(self) -> int:
        return int(self.windows.shape[0] * (self.seq_len - 1))

    @torch.no_grad()
    def __call__(self, model) -> dict:
        from tqdm.auto import tqdm

        from ..offload import input_device

        device = input_device(model)   # a dispatched model's first parameter may be on meta
        total_nll, start = 0.0, time.perf_counter()
        count = self.windows.shape[0]
        with tqdm(total=count, desc="perplexity", unit="window", disable=not self.progress, leave=False) as bar:
            for i in range(0, count, self.batch_size):
                ids = self.windows[i : i + self.batch_size].to(device)
                logits = model(ids, use_cache=False).logits[:, :-1].float()
                total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum").item()
                bar.update(ids.shape[0])
        nll = total_nll / self.predicted_tokens
        # settings' "tokens" counts every window token; the scored (predicted) count is the one reported
        return {**self.settings, "ppl": math.exp(nll), "nll": nll, "tokens": self.predicted_tokens,
                "seconds": time.perf_counter() - start}


def perplexity(model, tokenizer, dataset: str = "wikitext2", split: str = "test", seq_len: int = 128,
               max_windows: int | None = None, batch_size: int = 8, data_dir=None, progress: bool = True) -> dict:
    """Perplexity of ``model`` on ``dataset``/``split`` in non-overlapping ``seq_len`` windows."""
    return PerplexityEvaluator(tokenizer, dataset, split, seq_len, max_windows, batch_size, data_dir, progress)(model)
