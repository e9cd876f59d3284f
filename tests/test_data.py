"""Windows for perplexity and calibration: a tokenizer that marks every text with a BOS gets one per window."""
from __future__ import annotations

import torch
from tokenizers import processors

from conftest import byte_tokenizer
from selfprune.data import TextSource, bos_token_id, calibration_batch, token_windows

TEXT = TextSource("t", "test", ["Structured pruning removes whole heads and channels. " * 40], "memory")


def _bos_tokenizer():
    """The byte tokenizer, plus a <s> that it puts before every text (as Gemma's and LLaMA-2's do)."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    return tokenizer, bos


def test_windows_without_a_bos_tokenizer_are_the_plain_stream():
    tokenizer = byte_tokenizer()
    assert bos_token_id(tokenizer) is None
    windows = token_windows(tokenizer, TEXT, 16, max_windows=3)
    stream = tokenizer(TEXT.joined()).input_ids
    assert windows.tolist() == [stream[0:16], stream[16:32], stream[32:48]]


def test_each_window_and_calibration_sample_starts_with_the_bos():
    tokenizer, bos = _bos_tokenizer()
    assert bos_token_id(tokenizer) == bos
    windows = token_windows(tokenizer, TEXT, 16, max_windows=3)
    text = tokenizer(TEXT.joined(), add_special_tokens=False).input_ids
    assert windows.shape == (3, 16) and windows[:, 0].tolist() == [bos] * 3
    assert windows[:, 1:].tolist() == [text[0:15], text[15:30], text[30:45]]  # consecutive text, no token lost
    samples = calibration_batch(tokenizer, TEXT, 4, 16, seed=0)
    assert samples.shape == (4, 16) and bool((samples[:, 0] == bos).all()) and not bool((samples[:, 1:] == bos).any())
    assert samples.dtype == torch.long
