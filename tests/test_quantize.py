"""Deploy II: tied embeddings written once, llama.cpp's presets with pattern overrides, importance matrices.

The references are llama.cpp itself: its quantizer called directly on the f32 file (not through selfprune's
wrapper), its per-tensor routine from the shipped ggml library, and its own graph, evaluated with an eval
callback, for the importance matrix.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, byte_tokenizer, tiny_model

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: run scripts/install.sh")

from gguf import GGUFReader  # noqa: E402

from selfprune.calibration import CalibrationConfig  # noqa: E402
from selfprune.errors import SelfpruneError  # noqa: E402
from selfprune.evaluation.llamacpp import LlamaCppModel, llamacpp_imatrix  # noqa: E402
from selfprune.export import export_gguf, ties_embeddings  # noqa: E402
from selfprune.export.quantize import (ImportanceMatrix, TypeOverride, dequantize_tensor, file_tensor_types,  # noqa: E402
                                       parse_tensor_types, quantize_tensor, tensor_bytes)
from selfprune.imatrix import collect_imatrix  # noqa: E402
from selfprune.pruning import Pruner  # noqa: E402

#: presets whose types differ on the tiny model (rows of 256: every k-quant applies) without an imatrix
PRESETS = ("q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_k_s", "q4_0", "iq4_xs", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")


def _tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(str(path)).tensors}


def _reference_quantize(source, out, preset: str) -> None:
    """llama.cpp's quantizer called as llama-quantize calls it, with nothing but the preset."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset.upper()}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) == 0


@pytest.fixture(scope="module")
def wide_tiny():
    """A tiny LLaMA whose rows are 256 long (hidden 256, MLP 512): the k-quant presets apply their own types."""
    tokenizer = byte_tokenizer()
    model = tiny_model("llama-gqa", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, head_dim=64,
                       num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=8)
    return model, tokenizer


# -- tied embeddings -------------------------------------------------------------------------------------------
def test_tied_embedding_written_once_and_llama_cpp_uses_it(tmp_path):
    tokenizer = byte_tokenizer()
    tied = tiny_model("llama-mha", vocab_size=len(tokenizer))
    untied = tiny_model("llama-mha", vocab_size=len(tokenizer), tie_word_embeddings=False, seed=1)
    assert ties_embeddings(tied) and not ties_embeddings(untied)
    ids = torch.randint(0, len(tokenizer), (1, 48), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for name, model in (("tied", tied), ("untied", untied)):
        path = export_gguf(model, tokenizer, tmp_path / f"{name}.f32.gguf", "f32")
        tensors = _tensors(path)
        assert ("output.weight" in tensors) == (name == "untied")
        engine = LlamaCppModel(path, n_ctx=48, threads=1, kv_f32=True)
        try:
            theirs = engine.logits(ids[0].tolist())
        finally:
            engine.close()
        with torch.no_grad():
            ours = model(ids).logits[0].numpy()
        assert np.abs(ours - theirs).max() < 1e-4, name
        sizes[name] = path.stat().st_size
    embedding_bytes = tied.get_input_embeddings().weight.numel() * 4
    assert sizes["untied"] - sizes["tied"] >= embedding_bytes   # the duplicate is gone


# -- presets and overrides ----------------------------------------------------------------------------------------
def test_each_preset_is_llama_cpps_own_quantization(wide_tiny, tmp_path):
    """Every preset's file equals llama.cpp's quantizer run directly on the same f32 file, tensor by tensor,
    and every quantized tensor's bytes are what ggml_quantize_chunk makes of the f32 values (the per-tensor
    route a search uses); its dequantized values are what gguf-py reads back."""
    from gguf.quants import dequantize

    model, tokenizer = wide_tiny
    f32 = export_gguf(model, tokenizer, tmp_path / "tiny.f32.gguf", "f32")
    source = _tensors(f32)
    seen_types = set()
    for preset in PRESETS:
        ours = export_gguf(model, tokenizer, tmp_path / f"tiny.{preset}.gguf", preset, threads=1)
        reference = tmp_path / f"ref.{preset}.gguf"
        _reference_quantize(f32, reference, preset)
        assert ours.read_bytes() == reference.read_bytes(), preset
        for name, tensor in _tensors(ours).items():
            kind = tensor.tensor_type.name.lower()
            seen_types.add(kind)
            if kind in ("f32", "f16"):
                continue
            values = np.asarray(source[name].data, dtype=np.float32)
            data = np.asarray(tensor.data).reshape(-1).view(np.uint8)
            assert np.array_equal(quantize_tensor(values, kind), data), (preset, name, kind)
            assert data.size == tensor_bytes(kind, values.shape)
            ggml = dequantize_tensor(data, kind, values.shape)
            assert np.array_equal(ggml, dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(values.shape))
    assert {"q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "q5_0", "q4_0", "iq4_xs"} <= seen_types


@pytest.mark.integration
def test_smollm2_presets_are_llama_cpps_own_quantization(smol, tmp_path):
    """The default model's rows (576 values) make most k-quant tensors fall back to other types: each file is still
    byte-identical to llama.cpp's quantizer run directly on the same f32 file."""
    model, tokenizer = smol
    f32 = export_gguf(model, tokenizer, tmp_path / "smol.f32.gguf", "f32")
    for preset in ("q4_k_m", "q3_k_s", "q2_k"):
        ours = export_gguf(model, tokenizer, tmp_path / f"smol.{preset}.gguf", preset, threads=2)
        reference = tmp_path / f"ref.{preset}.gguf"
        _reference_quantize(f32, reference, preset)
        assert ours.read_bytes() == reference.read_bytes(), preset
        ours.unlink()
        reference.unlink()


def test_tensor_type_overrides_win_over_the_preset(wide_tiny, tmp_path):
    model, tokenizer = wide_tiny
    rules = parse_tensor_types(r"ffn_down=q8_0,blk\.0\.attn_=q6_k,attn_v=q5_k")
    path = export_gguf(model, tokenizer, tmp_path / "mixed.gguf", "q4_k_m", tensor_types=rules, threads=1)
    types = file_tensor_types(path)
    assert all(types[f"blk.{i}.ffn_down.weight"] == "q8_0" for i in range(8))
    assert {types[f"blk.0.attn_{p}.weight"] for p in ("q", "k", "v", "output")} == {"q6_k"}   # first rule that matches
    assert all(types[f"blk.{i}.attn_v.weight"] == "q5_k" for i in range(1, 8))
    assert types["blk.3.ffn_gate.weight"] == "q4_k"                                             # the preset's own
    # llama.cpp applies overrides within quantized presets only: asking for them on a float file is refused
    with pytest.raises(SelfpruneError, match="quantized outtype"):
        export_gguf(model, tokenizer, tmp_path / "f16-mixed.gguf", "f16", tensor_types=[TypeOverride("ffn_up", "q8_0")])
    assert not list(tmp_path.glob("*f16-mixed*"))


def test_tensor_types_file_and_bad_rules(tmp_path):
    rules = tmp_path / "types.txt"
    rules.write_text("# MLP output in 8 bits\nffn_down = Q8_0\n\nattn_v=q6_k  # values\n")
    assert parse_tensor_types(str(rules)) == [TypeOverride("ffn_down", "q8_0"), TypeOverride("attn_v", "q6_k")]
    for bad, words in (("ffn_down", "not pattern=type"), ("ffn_down=q9_k", "unknown tensor type"),
                       ("ffn_(down=q8_0", "not a regular expression"), ("missing/types.txt", "does not exist")):
        with pytest.raises(SelfpruneError, match=words):
            parse_tensor_types(bad)


# -- importance matrices ---------------------------------------------------------------------------------------
def _windows(tokenizer, count=4, length=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tokenizer) - 1, (count, length), generator=generator)


def _assert_same_imatrix(ours: ImportanceMatrix, theirs: ImportanceMatrix, tolerance: float) -> None:
    assert set(ours.sums) == set(theirs.sums)
    assert ours.counts == theirs.counts
    for name, values in ours.means().items():
        other = theirs.means()[name]
        assert np.abs(values - other).max() <= tolerance * np.abs(values).max(), name


@pytest.mark.parametrize("family", ["llama-gqa", "phi3"])   # Phi-3: fused qkv_proj / gate_up_proj in PyTorch
def test_imatrix_equals_llama_cpps_own_collection(family, tmp_path, monkeypatch):
    """selfprune's importance matrix of a pruned model (refit, heads and channels gone) is the one llama.cpp's
    graph computes from the exported file on the same tokens."""
    tokenizer = byte_tokenizer()
    model = tiny_model(family, vocab_size=len(tokenizer))
    windows = _windows(tokenizer)
    pruner = Pruner(model, tokenizer, "flap", CalibrationConfig(source="c4", num_samples=8, seq_len=32),
                    structure="proportional", progress=False, reconstruct="lstsq")
    pruned = pruner.build([0.3, 0.5, 0.1, 0.6])[0]
    # the same windows on both sides: give collect_imatrix these tokens as its calibration batch
    monkeypatch.setattr("selfprune.data.calibration_batch", lambda *a, **k: windows)
    ours = collect_imatrix(pruned, tokenizer, CalibrationConfig(num_samples=4, seq_len=48, batch_size=2))
    path = export_gguf(pruned, tokenizer, tmp_path / "pruned.f32.gguf", "f32", ffn_multiple=1)
    theirs = llamacpp_imatrix(path, windows.tolist())
    assert ours.counts["blk.0.attn_q.weight"] == windows.numel()
    assert ours.sums["blk.3.ffn_down.weight"].size == pruned.model.layers[3].mlp.down_proj.in_features
    # llama.cpp's attention rounds differently from PyTorch's in float32: o_proj's inputs differ by ~4e-4
    _assert_same_imatrix(ours, theirs, 2e-3)


@pytest.mark.integration
def test_smollm2_imatrix_equals_llama_cpps(smol, data_dir, tmp_path):
    from selfprune.data import calibration_batch, load_text

    model, tokenizer = smol
    calibration = CalibrationConfig(num_samples=4, seq_len=64, data_dir=str(data_dir))
    ours = collect_imatrix(model, tokenizer, calibration)
    ids = calibration_batch(tokenizer, load_text("c4", "validation", str(data_dir)), 4, 64, 0)
    path = export_gguf(model, tokenizer, tmp_path / "smol.f32.gguf", "f32")
    theirs = llamacpp_imatrix(path, ids.tolist())
    assert len(ours.sums) == 7 * 30
    # llama.cpp's attention differs from PyTorch's by float32 rounding; o_proj's inputs show it most (2e-3)
    _assert_same_imatrix(ours, theirs, 5e-3)


def test_imatrix_file_round_trip_and_legacy_format(tmp_path):
    matrix = ImportanceMatrix(datasets=["c4/validation 8x32"], chunk_size=32)
    rng = np.random.default_rng(0)
    matrix.add("blk.0.attn_q.weight", rng.random(64) * 10, 256)
    matrix.add("blk.0.attn_q.weight", rng.random(64), 256)
    matrix.add("blk.0.ffn_down.weight", rng.random(128), 512)
    path = matrix.save(tmp_path / "imatrix.gguf")
    # llama-imatrix's layout: <name>.in_sum2 (1 x n) and <name>.counts (1 x 1), datasets, chunk count and size
    reader = GGUFReader(str(path))
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert shapes == {"blk.0.attn_q.weight.in_sum2": (64, 1), "blk.0.attn_q.weight.counts": (1, 1),
                      "blk.0.ffn_down.weight.in_sum2": (128, 1), "blk.0.ffn_down.weight.counts": (1, 1)}
    assert {"imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"} <= set(reader.fields)
    loaded = ImportanceMatrix.load(path)
    assert loaded.counts == {"blk.0.attn_q.weight": 512, "blk.0.ffn_down.weight": 512}
    assert loaded.datasets == ["c4/validation 8x32"] and loaded.chunk_size == 32
    for name in matrix.sums:
        np.testing.assert_allclose(loaded.means()[name], matrix.means()[name], rtol=1e-6)
    # llama.cpp's older .dat: entries of (name, ncall, mean * ncall), then the last chunk and the dataset
    values = rng.random(64).astype(np.float32)
    legacy = tmp_path / "imatrix.dat"
    name = b"blk.1.attn_k.weight"
    legacy.write_bytes(struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 10, 64)
                       + (values * 10).tobytes() + struct.pack("<i", 10) + struct.pack("<i", 2) + b"c4")
    np.testing.assert_allclose(ImportanceMatrix.load(legacy).means()["blk.1.attn_k.weight"], values, rtol=1e-6)
    damaged = tmp_path / "damaged.dat"
    damaged.write_bytes(legacy.read_bytes()[:40])
    for bad in (damaged, tmp_path / "absent.gguf"):
        with pytest.raises(SelfpruneError, match=str(bad.name)):
            ImportanceMatrix.load(bad)


def test_imatrix_reaches_every_tensor_and_a_wrong_one_is_refused(wide_tiny, tmp_path):
    """With an importance matrix, each quantized matrix is exactly ggml's quantization weighted by its entry (so
    the names and the padding to the written widths are right); the bytes differ from the unweighted file; a
    matrix of other widths is refused before anything is written."""
    model, tokenizer = wide_tiny
    imatrix = ImportanceMatrix()
    rng = np.random.default_rng(1)
    for name, param in model.named_parameters():
        if name.endswith("proj.weight"):
            index, kind = name.split(".")[2], name.split(".")[-2]
            gguf_name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
            imatrix.add(f"blk.{index}.{gguf_name}.weight", rng.random(param.shape[1]) ** 4 * 100 + 1e-3, 100)
    f32 = _tensors(export_gguf(model, tokenizer, tmp_path / "t.f32.gguf", "f32"))
    plain = _tensors(export_gguf(model, tokenizer, tmp_path / "plain.gguf", "q3_k_m", threads=1))
    weighted_path = export_gguf(model, tokenizer, tmp_path / "weighted.gguf", "q3_k_m", threads=1, imatrix=imatrix,
                                imatrix_source="test.gguf")
    weighted = _tensors(weighted_path)
    means = imatrix.means()
    for name, tensor in weighted.items():
        if name not in means:
            continue
        kind = tensor.tensor_type.name.lower()
        values = np.asarray(f32[name].data, dtype=np.float32)
        data = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        assert np.array_equal(quantize_tensor(values, kind, means[name]), data), name
        assert not np.array_equal(np.asarray(plain[name].data).reshape(-1).view(np.uint8), data), name
    fields = GGUFReader(str(weighted_path)).fields
    assert bytes(fields["quantize.imatrix.file"].parts[-1]).decode() == "test.gguf"
    # the dense model's matrix given to a pruned model: refused, no file
    pruned = Pruner(model, tokenizer, "flap", CalibrationConfig(num_samples=4, seq_len=32), structure="proportional",
                    progress=False).build([0.5] * 8)[0]
    with pytest.raises(SelfpruneError, match="compute it for this model"):
        export_gguf(pruned, tokenizer, tmp_path / "wrong.gguf", "q4_k_m", imatrix=imatrix)
    assert not (tmp_path / "wrong.gguf").exists()
    assert not list(tmp_path.glob(".wrong.gguf*"))


# -- the command line -----------------------------------------------------------------------------------------
def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "selfprune", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=900)


@pytest.mark.integration
def test_cli_prune_imatrix_then_export_uses_it(data_dir, tmp_path):
    pruned = tmp_path / "p20"
    result = _cli("prune", "--rate", "0.2", "--out", str(pruned), "--save-imatrix", "--calib-samples", "8",
                  "--ppl-dataset", "none", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (pruned / "imatrix.gguf").is_file()
    matrix = ImportanceMatrix.load(pruned / "imatrix.gguf")
    assert matrix.tokens == 8 * 128 and len(matrix.sums) == 7 * 30
    out = tmp_path / "p20.q3_k_m.gguf"
    result = _cli("export", "--model", str(pruned), "--outtype", "q3_k_m", "--out", str(out), "--threads", "1",
                  "--tensor-types", "ffn_down=q5_0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "importance matrix" in result.stderr and str(pruned / "imatrix.gguf") in result.stderr
    fields = GGUFReader(str(out)).fields
    assert bytes(fields["quantize.imatrix.file"].parts[-1]).decode() == str(pruned / "imatrix.gguf")
    assert {t for n, t in file_tensor_types(out).items() if n.endswith("ffn_down.weight")} == {"q5_0"}
    # refusals: one line, exit 2, nothing written
    for args, words in ((["--outtype", "iq2_xs", "--no-imatrix"], "needs an importance matrix"),
                        (["--imatrix", str(pruned / "imatrix.gguf"), "--calibrate"], "exclude each other"),
                        (["--tensor-types", "ffn_down=q9"], "unknown tensor type")):
        result = _cli("export", "--model", str(pruned), "--out", str(tmp_path / "refused.gguf"), *args)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "refused.gguf").exists()


def test_search_saves_the_best_models_importance_matrix(tmp_path, capsys):
    """search --save-imatrix: the saved model's own matrix (its pruned widths) beside it, which export then uses."""
    from conftest import save_tiny_model

    from selfprune.cli import main
    from selfprune.models import load_model

    folder = save_tiny_model(tmp_path / "tiny", "llama-gqa", vocab_size=257)
    run = tmp_path / "run"
    assert main(["search", "--model", str(folder), "--target", "0.3", "--operator", "uniform", "--seq-len", "32",
                 "--fitness-windows", "2", "--fitness-dataset", "ptb", "--calib-samples", "4", "--calib-seq-len", "32",
                 "--device", "cpu", "--no-progress", "--save-imatrix", "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["imatrix"] is True
    matrix = ImportanceMatrix.load(run / "model" / "imatrix.gguf")
    model, tokenizer = load_model(str(run / "model"))
    for index, layer in enumerate(model.model.layers):
        assert matrix.sums[f"blk.{index}.ffn_down.weight"].size == layer.mlp.down_proj.in_features
        assert matrix.sums[f"blk.{index}.attn_output.weight"].size == layer.self_attn.o_proj.in_features
    assert matrix.tokens == 4 * 32
    out = tmp_path / "best.q8_0.gguf"
    assert main(["export", "--model", str(run / "model"), "--outtype", "q8_0", "--out", str(out), "--threads", "1"]) == 0
    fields = GGUFReader(str(out)).fields
    assert bytes(fields["quantize.imatrix.file"].parts[-1]).decode() == str(run / "model" / "imatrix.gguf")


def test_imatrix_follows_the_padding_of_one_shape_graphs(tmp_path):
    """Gemma 3 pruned (query heads gone in some layers): attn_output's entry goes back to the original head
    positions and ffn_down's is padded, so each quantized tensor is ggml's quantization weighted by them."""
    from selfprune.export.gguf_export import importance_for_file

    tokenizer = byte_tokenizer()
    model = tiny_model("gemma3", vocab_size=len(tokenizer), hidden_size=128, head_dim=32, intermediate_size=256)
    pruned = Pruner(model, tokenizer, "flap", CalibrationConfig(num_samples=4, seq_len=32), gqa_policy="query",
                    structure="proportional", bias_compensation=False, progress=False).build([0.3, 0.5, 0.1, 0.6])[0]
    assert any(layer.self_attn.o_proj.in_features < 128 for layer in pruned.model.layers)
    imatrix = collect_imatrix(pruned, tokenizer, CalibrationConfig(num_samples=4, seq_len=32))
    weights = importance_for_file(pruned, imatrix, 32)
    f32 = _tensors(export_gguf(pruned, tokenizer, tmp_path / "g.f32.gguf", "f32"))
    quantized = _tensors(export_gguf(pruned, tokenizer, tmp_path / "g.q8.gguf", "q4_0", imatrix=imatrix, threads=1))
    means = imatrix.means()
    for index, spec in enumerate(pruned.config.selfprune["layers"]):   # each kept head's entry at its own place
        name = f"blk.{index}.attn_output.weight"
        for position, head in enumerate(spec["kept_query_heads"]):
            np.testing.assert_array_equal(weights[name][head * 32:(head + 1) * 32],
                                          means[name][position * 32:(position + 1) * 32])
    for name in (f"blk.{i}.{t}.weight" for i in range(4) for t in ("attn_output", "ffn_down")):
        values = np.asarray(f32[name].data, dtype=np.float32)
        assert weights[name].shape == (values.shape[1],)
        tensor = quantized[name]
        data = np.asarray(tensor.data).reshape(-1).view(np.uint8)
        assert np.array_equal(quantize_tensor(values, tensor.tensor_type.name.lower(), weights[name]), data), name
