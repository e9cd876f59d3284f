"""Per-tensor types chosen before export (issue 32's foundation): the file's exact bytes counted in advance, and the
weights llama.cpp computes with reproduced in PyTorch.

References: llama.cpp's own quantizer writes the files (``llama_model_quantize`` with one override per tensor),
the file's bytes are read back with gguf-py, and llama.cpp evaluates them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import byte_tokenizer, tiny_model

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: run scripts/install.sh")

from gguf import GGUFReader  # noqa: E402

from selfprune.calibration import CalibrationConfig  # noqa: E402
from selfprune.errors import SelfpruneError  # noqa: E402
from selfprune.export import export_gguf  # noqa: E402
from selfprune.export.fake_quant import gguf_weights, quantize_weights_in_place  # noqa: E402
from selfprune.export.gguf_export import _permute_rope_rows, importance_for_file, layer_shapes  # noqa: E402
from selfprune.export.quantize import dequantize_tensor, file_tensor_types  # noqa: E402
from selfprune.export.sizing import (GGUFLayout, effective_type, exact_overrides, gguf_tensor_shapes,  # noqa: E402
                                     plan_types)
from selfprune.imatrix import collect_imatrix  # noqa: E402
from selfprune.pruning import Pruner  # noqa: E402

# a mix of block-256 and block-32 types, with and without importance-aware quantization
TYPES = ("q4_k", "q6_k", "q5_0", "q8_0", "iq4_nl", "q3_k", "q2_k", "q5_k", "f16", "q4_0")


def _pruned_wide_tiny(rates, family="llama-gqa", **overrides):
    """Rows of 256 (every k-quant applies) except ffn_down, whose kept widths are whatever pruning leaves."""
    tokenizer = byte_tokenizer()
    model = tiny_model(family, vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, head_dim=64,
                       num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=len(rates), **overrides)
    pruner = Pruner(model, tokenizer, "flap", CalibrationConfig(num_samples=4, seq_len=32), structure="proportional",
                    progress=False)
    return pruner.build(rates)[0], tokenizer


def _mixed_types(model, ffn_multiple, seed):
    rng = np.random.default_rng(seed)
    return {name: TYPES[int(rng.integers(len(TYPES)))] for name, _, _ in gguf_weights(model, ffn_multiple)}


def _export(model, tokenizer, path, types, importance, imatrix):
    return export_gguf(model, tokenizer, path, "q8_0", tensor_types=exact_overrides(types), imatrix=imatrix,
                       imatrix_source="test")


def test_effective_type_is_llama_cpps_fallback():
    assert effective_type("q4_k", 256) == "q4_k"
    assert effective_type("q4_k", 576) == "q5_0"        # 576 = 18 x 32, not a multiple of 256
    assert effective_type("q6_k", 576) == "q8_0"
    assert effective_type("q2_k", 576) == "q4_0"
    assert effective_type("iq2_xs", 576) == "iq4_nl"
    assert effective_type("q4_0", 48) == "f16"          # no 32-block fits
    assert effective_type("q4_k", 48) == "f16"


@pytest.mark.parametrize("tied", [True, False])
def test_planned_bytes_types_and_weights_are_the_files(tied, tmp_path):
    """Two pruned candidates of one model (other head counts and MLP widths in every layer): the layout measured on the first counts the second's file to the byte; every tensor has the planned type;
    and every matrix dequantized from the file equals the model's weights quantized in PyTorch, bit for bit."""
    ffn_multiple = 32
    first, tokenizer = _pruned_wide_tiny([0.0, 0.3, 0.5, 0.2], tie_word_embeddings=tied)
    second, _ = _pruned_wide_tiny([0.95, 0.6, 0.1, 0.9], tie_word_embeddings=tied)
    assert layer_shapes(first, ffn_multiple) != layer_shapes(second, ffn_multiple)
    layout = None
    for index, model in enumerate((first, second)):
        imatrix = collect_imatrix(model, tokenizer, CalibrationConfig(num_samples=4, seq_len=32))
        importance = importance_for_file(model, imatrix, ffn_multiple)
        asked = _mixed_types(model, ffn_multiple, seed=index)
        planned = plan_types(gguf_tensor_shapes(model, ffn_multiple), asked, "q8_0")
        types = {t.name: t.type for t in planned if t.name in asked}
        path = _export(model, tokenizer, tmp_path / f"c{index}.gguf", types, importance, imatrix)
        assert file_tensor_types(path) == {t.name: t.type for t in planned}
        if layout is None:
            layout = GGUFLayout.from_file(path)
        assert path.stat().st_size == layout.file_bytes(planned), index
        reader = {t.name: t for t in GGUFReader(str(path)).tensors}
        quantize_weights_in_place(model, types, importance, ffn_multiple)
        for name, parameter, written in gguf_weights(model, ffn_multiple):
            tensor = reader[name]
            rows = int(np.prod(tensor.shape[1:]))
            stored = dequantize_tensor(np.asarray(tensor.data).reshape(-1).view(np.uint8), types[name],
                                       (rows, written))[:parameter.shape[0], :parameter.shape[1]]   # less padding
            ours = parameter.detach()
            if name.endswith(("attn_q.weight", "attn_k.weight")):   # the file holds rope-permuted rows
                heads = ours.shape[0] // 64
                ours = _permute_rope_rows(ours, heads)
            assert np.array_equal(stored, ours.numpy()), name


def test_quantized_model_matches_llama_cpp_logits(tmp_path):
    """The PyTorch model with the file's weights computes what llama.cpp computes from the file (llama.cpp also
    quantizes activations for its quantized matmuls: close, not equal)."""
    from selfprune.evaluation.llamacpp import LlamaCppModel

    model, tokenizer = _pruned_wide_tiny([0.2, 0.4, 0.0, 0.3])
    asked = {name: ("q4_k" if i % 2 else "q8_0") for i, (name, _, _) in enumerate(gguf_weights(model, 32))}
    types = {t.name: t.type for t in plan_types(gguf_tensor_shapes(model, 32), asked, "q8_0") if t.name in asked}
    path = _export(model, tokenizer, tmp_path / "m.gguf", types, None, None)
    ids = torch.randint(0, len(tokenizer), (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_logits = model(ids).logits[0].numpy()
    quantize_weights_in_place(model, types, None, 32)
    with torch.no_grad():
        ours = model(ids).logits[0].numpy()
    engine = LlamaCppModel(path, n_ctx=40, threads=1, kv_f32=True)
    try:
        theirs = engine.logits(ids[0].tolist())
    finally:
        engine.close()
    gap_quantized = np.abs(ours - theirs).mean()
    gap_dense = np.abs(dense_logits - theirs).mean()
    assert gap_quantized < gap_dense / 3, (gap_quantized, gap_dense)


def test_a_type_that_does_not_fit_the_rows_is_refused():
    model, _ = _pruned_wide_tiny([0.3, 0.3])
    types = {name: "q8_0" for name, _, _ in gguf_weights(model, 1)}
    down = next(name for name in types if name.endswith("ffn_down.weight"))
    types[down] = "q4_k"   # unpadded kept widths are not multiples of 256
    with pytest.raises(SelfpruneError, match="cannot be stored as q4_k"):
        quantize_weights_in_place(model, types, None, 1)
    with pytest.raises(SelfpruneError, match="no type given"):
        quantize_weights_in_place(model, {}, None, 1)


@pytest.mark.integration
def test_smollm2_quantized_perplexity_is_llama_cpps(smol, data_dir, tmp_path):
    """SmolLM2 pruned by 20% with a mix of the types its 576-value rows hold and its own importance matrix:
    PyTorch's perplexity with the file's weights is within 1% of llama.cpp's on the same windows, and the
    file's size is the planned one (layout measured on the dense model's file)."""
    from selfprune.data import load_text, token_windows
    from selfprune.evaluation.llamacpp import gguf_perplexity, window_nll

    model, tokenizer = smol
    calibration = CalibrationConfig(num_samples=8, seq_len=128, data_dir=str(data_dir))
    windows = token_windows(tokenizer, load_text("wikitext2", "test", str(data_dir)), 128, 6)
    dense_types = {name: "q8_0" for name, shape in gguf_tensor_shapes(model, 32) if len(shape) == 2}
    dense_file = export_gguf(model, tokenizer, tmp_path / "dense.gguf", "q8_0", imatrix_source="test",
                             tensor_types=exact_overrides(dense_types), imatrix=collect_imatrix(model, tokenizer, calibration))
    layout = GGUFLayout.from_file(dense_file)   # measured once on the dense model: counts every candidate
    pruned = Pruner(model, tokenizer, "flap", calibration, progress=False).build([0.2] * 30)[0]
    imatrix = collect_imatrix(pruned, tokenizer, calibration)
    importance = importance_for_file(pruned, imatrix, 32)
    choices = ("q4_0", "iq4_nl", "q5_0", "q8_0", "q4_k")   # q4_k falls back to q5_0 on 576-value rows
    asked = {name: choices[i % len(choices)] for i, (name, _, _) in enumerate(gguf_weights(pruned, 32))}
    planned = plan_types(gguf_tensor_shapes(pruned, 32), asked, "q8_0")
    types = {t.name: t.type for t in planned if t.name in asked}
    path = export_gguf(pruned, tokenizer, tmp_path / "pruned.gguf", "q8_0", tensor_types=exact_overrides(types),
                       imatrix=imatrix, imatrix_source="test")
    assert path.stat().st_size == layout.file_bytes(planned)
    quantize_weights_in_place(pruned, types, importance, 32)
    with torch.no_grad():
        nll = sum(window_nll(pruned(row[None], use_cache=False).logits[0].numpy(), row.tolist()) for row in windows)
    torch_ppl = float(np.exp(nll / (windows.numel() - len(windows))))
    llama_ppl = gguf_perplexity(path, windows=windows, threads=2)["ppl"]
    assert abs(llama_ppl / torch_ppl - 1) < 0.01, (llama_ppl, torch_ppl)
