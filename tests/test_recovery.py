"""Recovery (selfprune.recovery) on tiny random models: it lowers the held-out loss and the KL to the teacher,
LoRA merges exactly, the result reloads without selfprune, a kill -9 then resume ends bitwise equal to an
uninterrupted run, and bad input gets one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import selfprune
from conftest import REPO, byte_tokenizer, c4_jsonl, run_without_selfprune, tiny_model, torch_threads
from selfprune.calibration import CalibrationConfig
from selfprune.errors import SelfpruneError
from selfprune.pruned_format import save_pruned
from selfprune.recovery import RecoveryConfig, attach_lora, heldout_metrics, load_training_data, merge_lora, recover

CALIB = CalibrationConfig(source="c4", num_samples=8, seq_len=32, seed=0)
VOCAB = 257  # the byte tokenizer's 256 bytes + </s>: small logits keep every step fast
FAST = dict(seq_len=32, batch_size=4, heldout_sequences=8, eval_every=10, log_every=5, checkpoint_every=10,
            learning_rate=1e-3, warmup_ratio=0.1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, data_dir) -> Path:
    """About 24 KB of the C4 sample as a user's .jsonl file (byte tokens: ~740 sequences of 32)."""
    return c4_jsonl(tmp_path_factory.mktemp("text") / "train.jsonl", data_dir, 24_000)


def pruned_pair(family: str, rate: float = 0.4, reconstruct: str = "bias"):
    """(dense teacher, FLAP-pruned student with bias compensation or a least-squares refit, tokenizer)."""
    tokenizer = byte_tokenizer()
    teacher = tiny_model(family, vocab_size=VOCAB)
    student, _ = selfprune.prune(teacher, rate, criterion="flap", tokenizer=tokenizer, calibration=CALIB,
                                 progress=False, reconstruct=reconstruct)
    return teacher, student, tokenizer


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["kd", "lm"])
def test_recovery_lowers_heldout_loss_and_kl(family, method, text_file, tmp_path):
    teacher, student, tokenizer = pruned_pair(family)
    assert any(layer.mlp.down_proj.bias is not None for layer in student.model.layers)  # FLAP compensation
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    config = RecoveryConfig(method=method, tokens=60 * 4 * 32, data=str(text_file), **FAST)
    recovered, summary = recover(student, tokenizer, tmp_path / "out", teacher=teacher, config=config,
                                 progress=False)
    before, after = summary["initial"], summary["final"]
    if method == "kd":  # a random teacher: distillation must pull the student's distributions onto it
        assert after["heldout_kl"] < 0.9 * before["heldout_kl"], (before, after)
    else:  # next-token loss on real text, measured on sequences never trained on
        assert after["heldout_lm_loss"] < before["heldout_lm_loss"] - 0.1, (before, after)
    # The numbers in the summary are what the returned model does on the held-out slice.
    data = load_training_data(tokenizer, str(text_file), "validation", 32, 8)
    assert heldout_metrics(recovered, teacher, data.heldout) == pytest.approx(after, rel=1e-5)
    # The teacher shared embeddings and norms with the pruned student: it must come out untouched.
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in teacher_before.items())
    log = json.loads((tmp_path / "out" / "selfprune_report.json").read_text())["recovery"]["curve"]
    assert [e["step"] for e in log if "heldout_lm_loss" in e] == [0, 10, 20, 30, 40, 50, 60]


def test_recovery_starts_from_the_refit_weights(text_file, tmp_path):
    """A refit model is recovered as it is: training starts from its refit o_proj / down_proj (the held-out
    numbers at step 0 are the refit model's, not the FLAP model's) and distillation improves on them."""
    teacher, refit, tokenizer = pruned_pair("llama-gqa", reconstruct="lstsq")
    _, flap, _ = pruned_pair("llama-gqa")
    data = load_training_data(tokenizer, str(text_file), "validation", 32, 8)
    refit_metrics, flap_metrics = (heldout_metrics(m, teacher, data.heldout) for m in (refit, flap))
    assert refit_metrics["heldout_kl"] != pytest.approx(flap_metrics["heldout_kl"], rel=1e-3)
    config = RecoveryConfig(method="kd", tokens=30 * 4 * 32, data=str(text_file), **FAST)
    _, summary = recover(refit, tokenizer, tmp_path / "out", teacher=teacher, config=config, progress=False)
    assert summary["initial"] == pytest.approx(refit_metrics, rel=1e-5)
    assert summary["final"]["heldout_kl"] < summary["initial"]["heldout_kl"]


def test_lora_merge_gives_the_unmerged_logits():
    _, student, _ = pruned_pair("llama-gqa")
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    peft_model = attach_lora(student, rank=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # peft starts B at zero: make the adapters do something
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        merged_model = merge_lora(peft_model)
        merged = merged_model(input_ids=ids).logits
        base_only = type(merged_model)  # the plain pruned class, not a peft wrapper
    assert not (unmerged - merged).abs().max() > 1e-5 * unmerged.abs().max()
    assert base_only.__name__.endswith("ForCausalLM")
    assert {k: v.shape for k, v in merged_model.state_dict().items()} == shapes


def test_lora_recovery_saves_plain_pruned_model_that_reloads_without_selfprune(text_file, tmp_path):
    teacher, student, tokenizer = pruned_pair("qwen3")
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    out = tmp_path / "recovered"
    config = RecoveryConfig(method="kd", tokens=20 * 4 * 32, lora_rank=4, data=str(text_file), **FAST)
    recovered, summary = recover(student, tokenizer, out, teacher=teacher, config=config, progress=False)
    assert summary["final"]["heldout_kl"] < summary["initial"]["heldout_kl"]
    weights = load_file(str(out / "model.safetensors"))
    assert not [k for k in weights if "lora" in k]
    assert {k: v.shape for k, v in weights.items()} == {k: v for k, v in shapes.items() if k in weights}
    recorded = json.loads((out / "config.json").read_text())["selfprune"]["recovery"]
    assert recorded["settings"]["lora_rank"] == 4 and recorded["settings"]["method"] == "kd"
    assert recorded["summary"]["final"]["heldout_kl"] == pytest.approx(summary["final"]["heldout_kl"])
    assert not (out / "log.jsonl").exists() and not list(out.glob("checkpoint-*"))  # run state replaced
    ids = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        expected = recovered(ids).logits
        assert torch.equal(selfprune.load(out)[0](ids).logits, expected)
    torch.save({"ids": ids, "logits": expected}, tmp_path / "expected.pt")
    body = f"""
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
data = torch.load({str(tmp_path / 'expected.pt')!r})
with torch.no_grad():
    assert torch.equal(model(data['ids']).logits, data['logits'])
print('OK')
"""
    run_without_selfprune(body, tmp_path)


CHILD = """
import sys, time
from selfprune.recovery import RecoveryConfig, recover_from_specs, resume_run
student, teacher, data, out, mode = sys.argv[1:6]
def on_step(entry):
    print("step", entry["step"], flush=True)
    if mode == "slow":
        time.sleep(0.5)  # room for the parent's SIGKILL between steps
if mode == "resume":
    resume_run(out, progress=False, on_step=on_step)
else:
    config = RecoveryConfig(method="mix", tokens=12 * 4 * 32, seq_len=32, batch_size=4, heldout_sequences=4,
                            checkpoint_every=2, eval_every=3, log_every=1, learning_rate=2e-3, data=data, seed=3)
    recover_from_specs(student, out, teacher=teacher, config=config, progress=False, on_step=on_step)
print("done", flush=True)
"""


def _child(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def test_resume_after_kill_9_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    teacher, student, tokenizer = pruned_pair("llama-gqa")
    save_pruned(student, tokenizer, tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    text = " ".join(f"sentence {i} about the weather in town {i % 7}." for i in range(30))
    (tmp_path / "small.txt").write_text(text)  # ~1,150 bytes: 31 sequences, 27 trained on, so 48 cross an epoch
    common = [tmp_path / "student", tmp_path / "teacher", tmp_path / "small.txt"]

    reference = _child([*common, tmp_path / "reference", "fast"])
    killed = _child([*common, tmp_path / "run", "slow"])
    for line in killed.stdout:
        if line.strip() == "step 5":  # checkpoint at step 4; step 5 is done but not checkpointed
            os.kill(killed.pid, signal.SIGKILL)
            break
    assert killed.wait(timeout=120) == -signal.SIGKILL
    assert json.loads((tmp_path / "run" / "latest_checkpoint.json").read_text())["step"] == 4
    assert not (tmp_path / "run" / "config.json").exists()
    resumed = _child([*common, tmp_path / "run", "resume"])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert out.split()[:2] == ["step", "5"] and out.strip().endswith("done")
    ref_out, ref_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_err[-2000:]

    final, expected = load_file(str(tmp_path / "run" / "model.safetensors")), \
        load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert not all(torch.equal(final[k], load_file(str(tmp_path / "student" / "model.safetensors"))[k])
                   for k in expected)  # it did train
    curve = lambda run: json.loads((tmp_path / run / "selfprune_report.json").read_text())["recovery"]["curve"]
    strip = lambda entries: [{k: v for k, v in e.items() if k != "seconds"} for e in entries]
    assert strip(curve("run")) == strip(curve("reference"))


# -- bad input: one line, nothing trained -------------------------------------------------------------------

def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


def test_bad_input_gets_one_line(text_file, tmp_path):
    teacher, student, tokenizer = pruned_pair("qwen2")
    ok = dict(data=str(text_file), **FAST)
    with pytest.raises(SelfpruneError) as excinfo:
        recover(student, tokenizer, tmp_path / "a", teacher=tiny_model("qwen2", vocab_size=VOCAB + 64),
                config=RecoveryConfig(tokens=4096, **ok))
    assert "vocabulary" in _one_line(excinfo)
    with pytest.raises(SelfpruneError) as excinfo:
        RecoveryConfig(tokens=0, **ok)
    assert "tokens= 0" in _one_line(excinfo)
    with pytest.raises(SelfpruneError) as excinfo:
        recover(student, tokenizer, tmp_path / "b", teacher=teacher, config=RecoveryConfig(tokens=100, **ok))
    assert "one optimizer step" in _one_line(excinfo)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(SelfpruneError) as excinfo:
        recover(student, tokenizer, tmp_path / "c", teacher=teacher, config=RecoveryConfig(tokens=4096, **ok | {"data": str(empty)}))
    assert "no text" in _one_line(excinfo)
    (tmp_path / "exists").mkdir()
    with pytest.raises(SelfpruneError) as excinfo:
        recover(student, tokenizer, tmp_path / "exists", teacher=teacher, config=RecoveryConfig(tokens=4096, **ok))
    assert "already exists" in _one_line(excinfo)
    with pytest.raises(SelfpruneError) as excinfo:
        recover(student, tokenizer, tmp_path / "d", teacher=teacher,
                config=RecoveryConfig(tokens=4096, **ok | {"data": "wikitext2", "data_split": "test"}))
    assert "test split" in _one_line(excinfo)
    with pytest.raises(SelfpruneError) as excinfo:
        recover(student, tokenizer, tmp_path / "e", teacher=None, config=RecoveryConfig(tokens=4096, **ok))
    assert "teacher" in _one_line(excinfo)
    with pytest.raises(SelfpruneError) as excinfo:
        recover(teacher, tokenizer, tmp_path / "f", teacher=teacher, config=RecoveryConfig(tokens=4096, **ok))
    assert "not pruned" in _one_line(excinfo)
    assert not [p.name for p in tmp_path.iterdir() if p.name not in ("empty.txt", "exists")]


def test_fitness_split_warns(tmp_path):
    with pytest.warns(UserWarning, match="selfprune search"):
        data = load_training_data(byte_tokenizer(), "ptb", "validation", 64, 4)
    assert data.train.shape[1] == 64 and data.heldout.shape == (4, 64)


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    from selfprune.cli import main

    (tmp_path / "taken").mkdir()
    assert main(["recover", "--model", str(tmp_path), "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out" in err and "already exists" in err
    assert main(["recover", "--resume", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a recovery run" in err
    with pytest.raises(SystemExit) as done:
        main(["recover", "--model", str(tmp_path), "--out", str(tmp_path / "new"), "--tokens", "lots"])
    assert done.value.code == 2 and "token count" in capsys.readouterr().err


def test_cli_recovers_a_saved_model_and_records_the_run(text_file, tmp_path, capsys):
    from selfprune.cli import main

    teacher, student, tokenizer = pruned_pair("qwen2")
    save_pruned(student, tokenizer, tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    out = tmp_path / "recovered"
    assert main(["recover", "--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                 "--data", str(text_file), "--tokens", "2.56k", "--seq-len", "32", "--batch-size", "4",
                 "--heldout-sequences", "8", "--learning-rate", "1e-3", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "KL to teacher" in printed and str(out) in printed
    recorded = json.loads((out / "config.json").read_text())["selfprune"]
    assert recorded["recovery"]["settings"]["tokens"] == 2560 and recorded["recovery"]["summary"]["steps"] == 20
    assert recorded["recovery"]["sources"]["teacher"] == str(tmp_path / "teacher")
    assert recorded["layers"] == json.loads((tmp_path / "student" / "config.json").read_text())["selfprune"]["layers"]
    assert main(["recover", "--resume", str(out)]) == 2
    assert "finished" in capsys.readouterr().err
