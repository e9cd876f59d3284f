"""Text data for calibration, fitness and perplexity: local copies first, the Hugging Face hub otherwise.

The data directory is, in this order: the ``data_dir`` argument (``--data-dir``), the ``SELFPRUNE_DATA_DIR``
environment variable, the folder saved in the user config (``selfprune config --data-dir``; the install
script saves ``../shared/data`` when it exists), else none and the standard hub datasets are used. It holds
the layout of the project's shared data (``wikitext2/wiki.test.raw``, ``ptb/ptb.valid.txt``,
``c4/c4_validation_2k.jsonl``, ...). Offline, a missing local copy fails at once instead of after the hub
client's retries.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import SelfpruneError, option

DATA_DIR_ENV = "SELFPRUNE_DATA_DIR"
TEXT_DATASETS = ("wikitext2", "ptb", "c4")
SPLIT_ALIASES = {"test": "test", "valid": "validation", "validation": "validation", "val": "validation"}

# Local file for (dataset, split), relative to the data directory.
_LOCAL_FILES = {
    ("wikitext2", "test"): "wikitext2/wiki.test.raw",
    ("wikitext2", "validation"): "wikitext2/wiki.valid.raw",
    ("ptb", "test"): "ptb/ptb.test.txt",
    ("ptb", "validation"): "ptb/ptb.valid.txt",
    ("c4", "validation"): "c4/c4_validation_2k.jsonl",
}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data directory (argument, environment, user config, in that order), or None for the hub."""
    from .user_config import read_user_config

    if data_dir is not None:
        chosen, where = data_dir, option("data_dir")
    elif os.environ.get(DATA_DIR_ENV):
        chosen, where = os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}"
    else:
        chosen, where = read_user_config().get("data_dir"), "the data folder saved by `selfprune config`"
    if not chosen:
        return None
    from .io import expect_folder

    return expect_folder(chosen, f"data directory (from {where})", "point it at the folder of the data files")


_HUB_STATE: dict = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached: decided once per process, in at most ``timeout`` seconds.
    The hub is ``HF_ENDPOINT`` where the user set one (a mirror), as huggingface_hub has it."""
    if "reachable" not in _HUB_STATE:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            _HUB_STATE["reachable"] = False
        else:
            import socket
            from urllib.parse import urlsplit

            endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
            try:
                port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
                socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
                _HUB_STATE["reachable"] = True
            except (OSError, ValueError):  # ValueError: a malformed port in HF_ENDPOINT
                _HUB_STATE["reachable"] = False
    if not _HUB_STATE["reachable"]:  # huggingface_hub's own requests too (its user-agent's registry fetch,
        from huggingface_hub import constants  # 3 s each time): its offline mode, for this process

        constants.HF_HUB_OFFLINE = True
    return _HUB_STATE["reachable"]


def _offline_error(what: str) -> SelfpruneError:
    return SelfpruneError(
        f"no local copy of {what} and the Hugging Face hub cannot be reached (offline): pass {option('data_dir')} "
        f"(or set {DATA_DIR_ENV}, or save a default with `selfprune config --data-dir`) with a folder holding the data"
    )


def _user_file(dataset: str) -> Path | None:
    """The path of a user's own text file, None for a standard dataset name; anything else is an error."""
    if dataset in TEXT_DATASETS:
        return None
    if Path(dataset).suffix in (".txt", ".raw", ".jsonl", ".json") or os.sep in dataset:
        return Path(dataset).expanduser()
    raise SelfpruneError(
        f"unknown dataset {dataset!r}: use one of {', '.join(TEXT_DATASETS)} or a path to a .txt or .jsonl file"
    )


def locate_text(dataset: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> tuple[str, str, Path | None]:
    """Where ``load_text`` reads ``dataset``/``split``, without reading it: ``(kind, split, path)`` with kind
    ``file`` (a user's file), ``local`` (the data folder) or ``hub`` (path None). Raises for a name, split or
    local file that cannot be read."""
    split = normalize_split(split)
    user_file = _user_file(dataset)
    if user_file is not None:
        return "file", split, user_file
    if dataset == "c4" and split == "test":
        raise SelfpruneError(f"c4 has no test split here: use {option('split')} validation")
    local_dir = resolve_data_dir(data_dir)
    if local_dir is None:
        return "hub", split, None
    path = local_dir / _LOCAL_FILES[(dataset, split)]
    if not path.is_file():
        raise SelfpruneError(f"missing data file {path}: restore it or point {option('data_dir')} at a complete "
                             "data folder")
    return "local", split, path


def check_text_available(dataset: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> None:
    """Fail now, not after loading a model, when ``load_text`` could not find this text."""
    kind, split, path = locate_text(dataset, split, data_dir)
    if kind == "file":
        _expect_text_file(path)
    if kind == "hub" and not hub_reachable():
        raise _offline_error(f"{dataset}/{split}")


def normalize_split(split: str) -> str:
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise SelfpruneError(f"unknown split {split!r}: use test or validation") from None


@dataclass
class TextSource:
    """A named body of text plus where it came from (recorded beside every number computed on it)."""

    name: str
    split: str
    documents: list[str]
    origin: str  # a local path or a hub dataset id

    def joined(self) -> str:
        """The documents as one stream, joined the way FLAP / LLM-Pruner join them for perplexity."""
        return "\n\n".join(self.documents)


def _wikitext_rows(raw: str) -> list[str]:
    # The hub's wikitext-2-raw-v1 rows are the file's lines; blank lines are empty rows.
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def _read_local(name: str, split: str, path: Path) -> list[str]:
    if name == "wikitext2":
        return _wikitext_rows(path.read_text(encoding="utf-8"))
    if name == "ptb":
        return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    if name == "c4":
        return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise AssertionError(name)


def _read_hub(name: str, split: str) -> tuple[list[str], str]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise SelfpruneError("the 'datasets' package is needed to read data from the hub: pip install datasets") from exc
    if not hub_reachable():
        raise _offline_error(f"{name}/{split}")
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return list(ds["text"]), "hub:wikitext/wikitext-2-raw-v1"
        if name == "ptb":
            ds = datasets.load_dataset("ptb_text_only", "penn_treebank", split=split)
            return list(ds["sentence"]), "hub:ptb_text_only/penn_treebank"
        if name == "c4":
            ds = datasets.load_dataset(
                "allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation"
            )
            return list(ds["text"][:2000]), "hub:allenai/c4 en validation shard 0"
    except Exception as exc:
        raise SelfpruneError(
            f"no local copy of {name}/{split} and the hub did not serve it ({type(exc).__name__}): "
            f"pass {option('data_dir')} (or set {DATA_DIR_ENV}) with a folder holding the data"
        ) from None
    raise AssertionError(name)


def load_text(dataset: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> TextSource:
    """Load a standard evaluation text (wikitext2, ptb, c4) or a local .txt / .jsonl file."""
    kind, split, path = locate_text(dataset, split, data_dir)
    if kind == "file":
        return load_text_file(path)
    if kind == "local":
        return TextSource(dataset, split, _read_local(dataset, split, path), str(path))
    documents, origin = _read_hub(dataset, split)
    return TextSource(dataset, split, documents, origin)


def _expect_text_file(path: Path) -> Path:
    from .io import expect_file

    return expect_file(path, "data file", "give a .txt or .jsonl file with text in it")


def load_text_file(path: Path) -> TextSource:
    """A user's own text: plain text (one document, or blank-line separated) or jsonl with a 'text' field."""
    _expect_text_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SelfpruneError(f"data file {path} is not UTF-8 text (byte {exc.start}): give a .txt or .jsonl "
                             "file of text") from None
    if path.suffix in (".jsonl", ".json"):
        documents = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise SelfpruneError(f"{path} line {number} is not JSON: give one JSON object with a 'text' field per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SelfpruneError(f"{path} line {number} has no string 'text' field: add one")
            documents.append(record["text"])
    else:
        documents = [text]
    if not any(doc.strip() for doc in documents):
        raise SelfpruneError(f"data file {path} holds no text: give a file with text in it")
    return TextSource(path.stem, "file", documents, str(path))


def bos_token_id(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before every text (Gemma, LLaMA-2), or None when it adds none (SmolLM2).

    Models trained with a BOS at the start of every sequence score windows without one badly (Gemma 3 270M:
    perplexity 245 instead of 45), so windows of such tokenizers start with it, as llama.cpp's perplexity does.
    """
    marked = tokenizer("a").input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and len(marked) > len(plain) and marked[0] == bos else None


def _text_ids(tokenizer, text: str, bos: int | None):
    """The text's token ids, without the BOS the windows get one by one."""
    return tokenizer(text, return_tensors="pt", add_special_tokens=bos is None).input_ids[0]


def _with_bos(windows, bos: int | None):
    import torch

    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def token_windows(tokenizer, source: TextSource, seq_len: int, max_windows: int | None = None):
    """Non-overlapping windows of ``seq_len`` tokens over the whole joined text (the standard perplexity setup);
    with a tokenizer that marks every text with a BOS, each window is that BOS and ``seq_len - 1`` text tokens."""
    import torch

    bos = bos_token_id(tokenizer)
    width = seq_len - (bos is not None)
    text = source.joined()
    ids = None
    if max_windows is not None:
        # Tokenize only a prefix: tokens before the last few of a prefix equal the full text's tokens.
        needed = max_windows * width + 64
        prefix = _text_ids(tokenizer, text[: needed * 8], bos)
        if prefix.numel() >= needed and needed * 8 < len(text):
            ids = prefix[: needed - 64]
    if ids is None:
        ids = _text_ids(tokenizer, text, bos)
    count = ids.numel() // width if width > 0 else 0
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise SelfpruneError(f"{source.name}/{source.split} has fewer than {seq_len} tokens: lower {option('seq_len')}")
    return _with_bos(ids[: count * width].view(count, width).to(torch.long), bos)


def calibration_batch(tokenizer, source: TextSource, num_samples: int, seq_len: int, seed: int):
    """Random ``seq_len``-token windows from documents long enough to hold one (Wanda / SparseGPT sampling);
    with a BOS-marking tokenizer each starts with the BOS, as the model saw text in training."""
    import torch

    bos = bos_token_id(tokenizer)
    width = seq_len - (bos is not None)
    rng = random.Random(seed)
    order = list(range(len(source.documents)))
    rng.shuffle(order)
    samples = []
    for index in order:
        ids = _text_ids(tokenizer, source.documents[index], bos)
        if ids.numel() <= width:
            continue
        start = rng.randint(0, ids.numel() - width - 1)
        samples.append(ids[start : start + width])
        if len(samples) == num_samples:
            break
    if len(samples) < num_samples:
        # Short documents (PTB sentences): fall back to windows over the joined stream.
        stream = _text_ids(tokenizer, source.joined(), bos)
        if stream.numel() <= width:
            raise SelfpruneError(f"{source.name} has fewer than {seq_len} tokens: lower the calibration sequence length "
                                 "(--calib-seq-len; CalibrationConfig.seq_len in Python)")
        while len(samples) < num_samples:
            start = rng.randint(0, stream.numel() - width - 1)
            samples.append(stream[start : start + width])
    return _with_bos(torch.stack(samples).to(torch.long), bos)
