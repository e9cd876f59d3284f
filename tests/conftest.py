"""Shared fixtures: tiny random-weight models of every supported family, the local data, the real SmolLM2."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from llama_server import llama_server  # noqa: F401  (one real llama.cpp server for the whole session)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests read the project's local data copies unless the caller points elsewhere.
if "SELFPRUNE_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["SELFPRUNE_DATA_DIR"] = str(SHARED_DATA)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The user's saved defaults (`selfprune config`) stay out of the tests; a test that needs them sets its own.
os.environ["SELFPRUNE_CONFIG"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"selfprune-test-config-{os.getpid()}.json")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skipped test fails: a missing llama.cpp server, data folder or model must not pass
    CI silently. Tests that can only run on hardware CI lacks carry ``@pytest.mark.needs_gpu``."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not item.get_closest_marker("needs_gpu") \
            and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run every test: {reason}"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["SELFPRUNE_DATA_DIR"])
    assert path.is_dir(), f"test data missing at {path}"
    return path


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The default model as a safetensors folder (converted from the packaged GGUF once, then cached)."""
    from selfprune.models import resolve_model_spec

    return resolve_model_spec("default")


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="session")
def smol(smol_dir):
    from selfprune.models import load_model

    return load_model(smol_dir)


_GEMMA3 = {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8, "pad_token_id": 0,
           "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]}

FAMILIES = {
    # name: (config class path, extra config)
    "llama-gqa": ("LlamaConfig", {"num_attention_heads": 6, "num_key_value_heads": 2}),
    "llama-mha": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "mistral": ("MistralConfig", {"num_attention_heads": 6, "num_key_value_heads": 3, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {"num_attention_heads": 6, "num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16}),
    # Gemma 3: q/k norms, GeGLU, scaled embeddings, sliding-window (8 tokens) and global layers, head_dim
    # independent of hidden / heads; "-mqa" has Gemma 3 270M's single key-value head.
    "gemma3": ("Gemma3TextConfig", _GEMMA3 | {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "gemma3-mqa": ("Gemma3TextConfig", _GEMMA3 | {"num_attention_heads": 4, "num_key_value_heads": 1}),
    # Gemma 2: the same modules, with attention and final logit soft-capping.
    "gemma2": ("Gemma2Config", _GEMMA3 | {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 16,
                                         "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    # Phi-3: fused qkv_proj and gate_up_proj.
    "phi3": ("Phi3Config", {"num_attention_heads": 6, "num_key_value_heads": 2, "pad_token_id": 0,
                            "bos_token_id": 1, "eos_token_id": 1}),
    # Llama 3.1-style rope scaling (original context 64 of 256).
    "llama3-rope": ("LlamaConfig", {"num_attention_heads": 6, "num_key_value_heads": 2, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
}


def tiny_model(family: str, vocab_size: int = 49152, seed: int = 0, **config_overrides):
    """A random-weight model of ``family`` small enough for unit tests (4 layers, hidden 96); keywords override
    the family's config (e.g. ``attention_bias=True, mlp_bias=True``)."""
    import transformers

    config_name, extra = FAMILIES[family]
    defaults = {"vocab_size": vocab_size, "hidden_size": 96, "intermediate_size": 128, "num_hidden_layers": 4,
                "max_position_embeddings": 256, "tie_word_embeddings": True,
                "head_dim": 96 // extra["num_attention_heads"]}
    config = getattr(transformers, config_name)(**(defaults | extra | config_overrides))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Random init gives near-zero activations' spread; larger weights make the masking tests meaningful.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    return model


def byte_tokenizer():
    """A byte-level tokenizer (256 symbols + ``</s>``, with a chat template) for tiny models: no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["</s>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="</s>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return tokenizer


def run_without_selfprune(body: str, home: Path, timeout: int = 600) -> None:
    """Run ``body`` (Python that ends by printing OK) in a fresh interpreter where selfprune cannot be imported,
    as a user without selfprune would load a pruned folder with plain transformers."""
    import subprocess
    import sys

    script = "import sys\nsys.modules['selfprune'] = None  # any import of selfprune now fails\n" + body
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(home)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("OK")


@contextmanager
def torch_threads(count: int):
    """Torch on ``count`` threads for the block: tiny matrices on a shared CPU run ~10x slower when two threads
    spin against other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def c4_jsonl(out: Path, data_dir: Path, min_chars: int) -> Path:
    """The first documents of the C4 sample, at least ``min_chars`` of text, as a user's .jsonl file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = (data_dir / "c4" / "c4_validation_2k.jsonl").read_text().splitlines()
    size, chosen = 0, []
    for line in lines:
        chosen.append(line)
        size += len(json.loads(line)["text"])
        if size > min_chars:
            break
    out.write_text("\n".join(chosen) + "\n")
    return out


def save_tiny_model(folder: Path, family: str = "llama-gqa", vocab_size: int = 257) -> Path:
    """A tiny random model of ``family`` with the byte tokenizer, saved as a model folder (loadable by path)."""
    tiny_model(family, vocab_size=vocab_size).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@torch.no_grad()
def dense_projection_inputs(model, ids) -> list[dict[str, torch.Tensor]]:
    """Per layer, every token's input to o_proj and down_proj (float64 rows), from a plain dense forward."""
    from selfprune.adapters import get_adapter

    adapter = get_adapter(model)
    captured = [{"o": [], "down": []} for _ in adapter.layers()]
    handles = []
    for store, layer in zip(captured, adapter.layers()):
        for key, linear in (("o", adapter.attention_linears(layer).o), ("down", adapter.mlp_linears(layer).down)):
            handles.append(linear.register_forward_pre_hook(
                lambda _m, args, rows=store[key]: rows.append(args[0].reshape(-1, args[0].shape[-1]).double())))
    try:
        model(ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [{key: torch.cat(rows) for key, rows in store.items()} for store in captured]
