"""Big-model pruning within a memory budget: a tiny model loaded with accelerate's ``device_map="auto"``, a
CPU budget smaller than the model and a disk offload folder prunes exactly as the same model in memory, with
calibration's activations bounded by its chunk size."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import byte_tokenizer, tiny_model
from selfprune.adapters import get_adapter
from selfprune.calibration import CalibrationConfig, calibrate
from selfprune.errors import SelfpruneError
from selfprune.models import load_model
from selfprune.models.loading import parse_max_memory
from selfprune.pruned_format import INDICES_FILE, load_pruned, save_pruned
from selfprune.pruning import Pruner

#: The tiny model takes ~1.4 MB in float32: this budget holds the embeddings and one layer, the rest goes to disk.
CPU_BUDGET = 900_000
CALIB = CalibrationConfig(source="c4", num_samples=16, seq_len=32, seed=0, batch_size=4, chunk_samples=8)
RATES = [0.1, 0.3, 0.5, 0.7]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Folders of a tiny llama (GQA) and a tiny Phi-3 (fused projections), each with a byte tokenizer."""
    root = tmp_path_factory.mktemp("offload")
    dirs = {}
    for family in ("llama-gqa", "phi3"):
        folder = root / family
        tiny_model(family, vocab_size=1000).save_pretrained(folder)
        byte_tokenizer().save_pretrained(folder)
        dirs[family] = folder
    return dirs


def offloaded(folder, offload_dir):
    return load_model(str(folder), device_map="auto", max_memory={"cpu": CPU_BUDGET}, offload_dir=str(offload_dir))


def test_budget_sends_weights_to_disk(model_dirs, tmp_path):
    model, _ = offloaded(model_dirs["llama-gqa"], tmp_path / "offload")
    placements = set(model.hf_device_map.values())
    assert {"cpu", "disk"} <= placements, model.hf_device_map
    devices = {p.device.type for p in model.parameters()}
    assert devices == {"cpu", "meta"}   # disk-offloaded weights wait on meta until a hook loads them
    # A safetensors checkpoint is read in place: the folder exists but needs no copies.
    assert (tmp_path / "offload").is_dir()


def test_max_memory_text_is_parsed_and_checked():
    assert parse_max_memory("0:70GiB,cpu:200GiB") == {0: 70 * 2**30, "cpu": 200 * 2**30}
    assert parse_max_memory({"0": "1MiB", "cpu": 5}) == {0: 2**20, "cpu": 5}   # as JSON gives it back
    assert parse_max_memory("cuda:1:2GB, mps:1000") == {1: 2 * 10**9, "mps": 1000}
    for bad in ("cpu", "cpu:lots", "gpu0:1GiB", "cpu:0", "cpu:1GiB,cpu:2GiB", ""):
        with pytest.raises(SelfpruneError, match="max_memory"):
            parse_max_memory(bad)
    with pytest.raises(SelfpruneError, match="device_map"):
        load_model("unused", max_memory="cpu:1GiB")


@pytest.mark.parametrize("family", ["llama-gqa", "phi3"])
def test_offloaded_pruning_is_bit_identical_to_in_memory(family, model_dirs, tmp_path):
    folder = model_dirs[family]
    dense, tokenizer = load_model(str(folder))
    big, big_tokenizer = offloaded(folder, tmp_path / "offload")
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    criteria = ("flap", "magnitude") if family == "llama-gqa" else ("flap",)
    for criterion in criteria:
        in_memory = Pruner(dense, tokenizer, criterion, CALIB, structure="standardized", progress=False)
        on_disk = Pruner(big, big_tokenizer, criterion, CALIB, structure="standardized", progress=False)
        if in_memory.calibration:
            for a, b in zip(in_memory.calibration.layers, on_disk.calibration.layers):
                assert torch.equal(a.down_in.total_sq, b.down_in.total_sq) and torch.equal(a.o_in.total, b.o_in.total)
        pruned, report = in_memory.build(RATES)
        pruned_big, report_big = on_disk.build(RATES)
        assert report_big.to_dict()["layers"] == report.to_dict()["layers"]   # kept heads and channels, biases
        assert {p.device.type for p in pruned_big.parameters()} == {"cpu"}    # a plain model that owns its weights
        with torch.no_grad():
            expected = pruned(ids, use_cache=False).logits
            assert torch.equal(pruned_big(ids, use_cache=False).logits, expected)
        save_pruned(pruned, tokenizer, tmp_path / f"{criterion}-memory")
        save_pruned(pruned_big, big_tokenizer, tmp_path / f"{criterion}-disk")
        indices = [json.loads((tmp_path / f"{criterion}-{where}" / INDICES_FILE).read_text()) for where in ("memory", "disk")]
        assert indices[0] == indices[1]
        with torch.no_grad():
            assert torch.equal(load_pruned(tmp_path / f"{criterion}-disk")(ids, use_cache=False).logits, expected)
    # The dense model is untouched: still offloaded, still computing what the in-memory one does.
    assert "meta" in {p.device.type for p in big.parameters()}
    with torch.no_grad():
        assert torch.equal(big(ids, use_cache=False).logits, dense(ids, use_cache=False).logits)


def test_calibration_memory_is_bounded_by_the_chunk(model_dirs, tmp_path):
    """Twice the samples in the same chunks hold no more activations; the statistics do not depend on the
    chunk size, bit for bit; an offloaded layer is read once per chunk, not once per batch."""
    big, tokenizer = offloaded(model_dirs["llama-gqa"], tmp_path / "offload")
    adapter = get_adapter(big)
    q_hook = adapter.attention_linears(adapter.layers()[3]).q._hf_hook
    loads = []
    original_pre_forward = q_hook.pre_forward
    q_hook.pre_forward = lambda module, *a, **k: loads.append(q_hook.offload) or original_pre_forward(module, *a, **k)
    try:
        small = calibrate(big, tokenizer, adapter, CALIB, progress=False)
    finally:
        del q_hook.pre_forward
    # 16 samples, chunks of 8, batches of 4: a load (offload on) per chunk, then the batches use it as it is
    assert small.extra["chunks"] == 2 and loads == [True, False, False] * 2
    double = calibrate(big, tokenizer, adapter, CalibrationConfig(**CALIB.to_dict() | {"num_samples": 32}),
                       progress=False)
    assert double.extra["chunks"] == 4
    assert 0 < double.extra["peak_activation_bytes"] <= small.extra["peak_activation_bytes"]
    assert double.extra["process_peak_rss_bytes"] > 0
    whole = calibrate(big, tokenizer, adapter, CalibrationConfig(**CALIB.to_dict() | {"chunk_samples": 1000}),
                      progress=False)
    assert whole.extra["chunks"] == 1 and whole.extra["peak_activation_bytes"] > small.extra["peak_activation_bytes"]
    for a, b in zip(small.layers, whole.layers):
        for name in ("attn_in", "o_in", "mlp_in", "down_in"):
            assert torch.equal(getattr(a, name).total, getattr(b, name).total)
            assert torch.equal(getattr(a, name).total_sq, getattr(b, name).total_sq)


def test_cli_prunes_within_a_budget(model_dirs, tmp_path, capsys):
    from selfprune.cli import main

    folder = model_dirs["llama-gqa"]
    common = ["prune", "--model", str(folder), "--device", "cpu", "--rate", "0.3", "--calib-samples", "16",
              "--calib-seq-len", "32", "--seq-len", "32", "--max-windows", "2"]
    assert main(common + ["--out", str(tmp_path / "memory")]) == 0
    assert main(common + ["--out", str(tmp_path / "disk"), "--device-map", "auto", "--max-memory", f"cpu:{CPU_BUDGET}",
                          "--offload-dir", str(tmp_path / "offload")]) == 0
    reports = [json.loads((tmp_path / where / "selfprune_report.json").read_text()) for where in ("memory", "disk")]
    assert reports[0]["report"]["layers"] == reports[1]["report"]["layers"]
    assert reports[0]["perplexity"]["dense"]["ppl"] == reports[1]["perplexity"]["dense"]["ppl"]
    assert reports[0]["perplexity"]["pruned"]["ppl"] == reports[1]["perplexity"]["pruned"]["ppl"]
    calibration = reports[1]["report"]["calibration"]
    assert calibration["peak_activation_bytes"] > 0 and calibration["chunk_samples"] == CalibrationConfig.chunk_samples
    config = json.loads((tmp_path / "disk" / "config.json").read_text())
    assert config["selfprune"]["calibration"]["peak_activation_bytes"] == calibration["peak_activation_bytes"]
    assert (json.loads((tmp_path / "memory" / INDICES_FILE).read_text())
            == json.loads((tmp_path / "disk" / INDICES_FILE).read_text()))


@pytest.mark.parametrize("options,flag", [
    (["--max-memory", "cpu:1GiB"], "--max-memory only acts with --device-map"),
    (["--offload-dir", "OFFLOAD"], "--offload-dir only acts with --device-map"),
    (["--device-map", "auto", "--max-memory", "cpu=1GiB"], "argument --max-memory: entry 'cpu=1GiB' is not DEVICE:SIZE"),
    (["--device-map", "auto", "--max-memory", "cpu:lots"], "argument --max-memory: size 'lots'"),
])
def test_cli_refuses_a_budget_it_cannot_use(options, flag, model_dirs, tmp_path, capsys):
    from selfprune.cli import main

    options = [str(tmp_path / "offload") if o == "OFFLOAD" else o for o in options]
    argv = ["prune", "--model", str(model_dirs["llama-gqa"]), "--rate", "0.3", "--out", str(tmp_path / "out")] + options
    try:
        code = main(argv)
    except SystemExit as exit:   # argparse's usage errors
        code = exit.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # nothing written: no output, no offload folder
