"""Training text for recovery: packed into fixed-length sequences, with a held-out slice the training never sees.

Recovery must not train on a split that is reported: WikiText-2 / PTB *test* are refused, and their
*validation* splits (what ``selfprune search`` scores candidates on) are allowed with a warning.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import load_text
from ..errors import SelfpruneError

# Reported splits, also when given as a path to the local copy.
_REPORTED_FILES = {"wiki.test.raw", "ptb.test.txt"}
_FITNESS_FILES = {"wiki.valid.raw", "ptb.valid.txt"}


@dataclass
class PackedData:
    """``train`` and ``heldout`` are (sequences, seq_len) token ids; ``origin`` says where the text came from."""

    train: torch.Tensor
    heldout: torch.Tensor
    name: str
    split: str
    origin: str

    def describe(self) -> dict:
        return {"data": self.name, "split": self.split, "origin": self.origin,
                "seq_len": int(self.train.shape[1]), "train_sequences": int(self.train.shape[0]),
                "heldout_sequences": int(self.heldout.shape[0]), "heldout_tokens": int(self.heldout.numel())}


def check_training_source(data: str, split: str) -> None:
    """Refuse reported test splits; warn for the validation split the search uses as fitness."""
    name = Path(data).name
    is_named = data in ("wikitext2", "ptb")
    if (is_named and split == "test") or name in _REPORTED_FILES:
        raise SelfpruneError(
            f"refusing to train on {data} {'test' if is_named else ''}".rstrip()
            + ": it is a reported test split; train on c4 or your own .txt / .jsonl file"
        )
    if (is_named and split in ("validation", "valid", "val")) or name in _FITNESS_FILES:
        warnings.warn(f"training on {data} validation, the split `selfprune search` scores candidates on: "
                      "search fitness measured on it after recovery is no longer unbiased", stacklevel=3)


def pack_sequences(tokenizer, documents: list[str], seq_len: int) -> torch.Tensor:
    """Tokenize every document, join them with the end-of-text token, cut the stream into ``seq_len`` rows."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    texts = [doc for doc in documents if doc.strip()]
    for start in range(0, len(texts), 256):
        for ids in tokenizer(texts[start:start + 256], add_special_tokens=False).input_ids:
            stream.extend(ids)
            stream.extend(separator)
    count = len(stream) // seq_len
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def load_training_data(tokenizer, data: str = "c4", split: str = "validation", seq_len: int = 256,
                       heldout_sequences: int = 32, data_dir=None) -> PackedData:
    """Packed training sequences and the held-out slice (the last ``heldout_sequences`` rows of the stream)."""
    if seq_len < 2:
        raise SelfpruneError(f"seq_len={seq_len} is too short: use at least 2 tokens per sequence")
    if heldout_sequences < 1:
        raise SelfpruneError(f"heldout_sequences={heldout_sequences}: keep at least 1 held-out sequence")
    check_training_source(data, split)
    source = load_text(data, split, data_dir)
    packed = pack_sequences(tokenizer, source.documents, seq_len)
    if packed.shape[0] <= heldout_sequences:
        raise SelfpruneError(
            f"{source.origin} gives {packed.shape[0]} sequences of {seq_len} tokens, not more than the "
            f"{heldout_sequences} held out: give more text or lower seq_len / heldout_sequences"
        )
    return PackedData(packed[:-heldout_sequences], packed[-heldout_sequences:], source.name, source.split,
                      source.origin)


def sequence_order(num_sequences: int, count: int, start: int, seed: int) -> torch.Tensor:
    """Indices of training sequences ``start .. start+count`` in the run's fixed order: one seeded shuffle per
    epoch, so any position in the run (the checkpoint's data cursor) maps to the same sequences every time."""
    indices = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_sequences)
        indices.append(_epoch_permutation(num_sequences, seed, epoch)[offset])
    return torch.stack(indices)


_PERMUTATIONS: dict[tuple[int, int, int], torch.Tensor] = {}


def _epoch_permutation(num_sequences: int, seed: int, epoch: int) -> torch.Tensor:
    key = (num_sequences, seed, epoch)
    if key not in _PERMUTATIONS:
        _PERMUTATIONS.clear()  # one epoch's order in memory at a time
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        _PERMUTATIONS[key] = torch.randperm(num_sequences, generator=generator)
    return _PERMUTATIONS[key]
