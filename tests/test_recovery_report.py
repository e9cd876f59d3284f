"""``selfprune report`` on recovery folders (finished, and still in progress) and the recovery of a search's best
model (selfprune.recovery.recover_search_model), on tiny random models: the report's numbers and plotted data are
the logged ones, search reports keep working, a folder of neither kind is one line and exit 2."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import selfprune
from conftest import byte_tokenizer, c4_jsonl, tiny_model, torch_threads
from selfprune.calibration import CalibrationConfig
from selfprune.cli import main
from selfprune.evaluation import recovery_report
from selfprune.recovery import (RecoveryConfig, heldout_metrics, load_training_data, recover, recover_search_model,
                                recovered_model_dir, trainer)

PNG = b"\x89PNG\r\n\x1a\n"
VOCAB = 257
FAST = dict(seq_len=32, batch_size=4, heldout_sequences=8, log_every=2, learning_rate=1e-3, warmup_ratio=0.1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, data_dir) -> Path:
    """About 16 KB of the C4 sample as a user's .jsonl file (byte tokens: ~500 sequences of 32)."""
    return c4_jsonl(tmp_path_factory.mktemp("text") / "train.jsonl", data_dir, 16_000)


class Stop(Exception):
    """Raised from ``on_step`` to stop a run the way a kill would, after a checkpoint."""


def _stop_at(step: int):
    def on_step(entry):
        if entry["step"] == step:
            raise Stop

    return on_step


def _lines_by_label(fig) -> dict[str, list[float]]:
    """Each drawn line's points as x0, y0, x1, y1, ..."""
    return {line.get_label(): [float(v) for xy in line.get_xydata() for v in xy]
            for ax in fig.axes for line in ax.get_lines()}


def _logged(curve: list[dict], key: str) -> list[float]:
    """The logged (tokens seen, value) pairs of ``key``, as x0, y0, x1, y1, ..."""
    return [float(v) for e in curve if key in e for v in (e["tokens"], e[key])]


def test_the_report_names_the_trainer_files():
    assert (recovery_report.RUN_FILE, recovery_report.LOG_FILE, recovery_report.LATEST_FILE) == \
        (trainer.RUN_FILE, trainer.LOG_FILE, trainer.LATEST_FILE)


def test_report_of_a_recovery_in_progress_then_finished(text_file, tmp_path, capsys):
    tokenizer = byte_tokenizer()
    teacher = tiny_model("llama-gqa", vocab_size=VOCAB)
    student, _ = selfprune.prune(teacher, 0.4, criterion="flap", tokenizer=tokenizer, progress=False,
                                 calibration=CalibrationConfig(source="c4", num_samples=8, seq_len=32, seed=0))
    out = tmp_path / "recovered"
    config = RecoveryConfig(method="kd", tokens=12 * 4 * 32, data=str(text_file), eval_every=4, checkpoint_every=4,
                            **FAST)
    with pytest.raises(Stop):
        recover(student, tokenizer, out, teacher=teacher, config=config, progress=False, on_step=_stop_at(6))

    # in progress (here: stopped after the checkpoint at step 4): the log so far, the state, how to resume
    assert main(["report", str(out)]) == 0
    assert "loss.png" in capsys.readouterr().out
    text = (out / "report" / "report.md").read_text()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 2, 4, 6]
    assert "not finished (stopped)" in text and "last checkpoint at step 4" in text
    assert "resume a stopped run with `recover(..., resume=True)`" in text and "latest (step 4)" in text
    assert "768 so far of 1,536 (6 of 12 steps of 4 sequences x 32 tokens)" in text
    assert all(f"| {e['step']} | {e['tokens']:,} | " in text for e in log)
    assert (out / "report" / "loss.png").read_bytes().startswith(PNG)

    # finished: the recorded settings, before/after and the whole curve, plotted as logged
    recovered, summary = recover(student, tokenizer, out, teacher=teacher, config=config, progress=False,
                                 resume=True)
    assert summary["resumed_from_step"] == 4
    assert main(["report", str(out)]) == 0
    text = (out / "report" / "report.md").read_text()
    curve = json.loads((out / "selfprune_report.json").read_text())["recovery"]["curve"]
    assert [e["step"] for e in curve] == [0, 2, 4, 6, 8, 10, 12]
    assert curve[:3] == log[:3]  # the resumed run kept the log up to its checkpoint
    for entry in curve:  # the table of logged values
        train = f"{entry['train_loss']:.6g}" if "train_loss" in entry else ""
        row = f"| {entry['step']} | {entry['tokens']:,} | {train}"
        assert row in text, row
        if "heldout_lm_loss" in entry:
            assert f"{entry['heldout_lm_loss']:.6g} | {entry['heldout_kl']:.6g} |" in text
    before, after = summary["initial"], summary["final"]
    assert (f"| held-out next-token loss (nats/token) | {before['heldout_lm_loss']:.6g} | "
            f"{after['heldout_lm_loss']:.6g} | {after['heldout_lm_loss'] - before['heldout_lm_loss']:+.6g} |") in text
    assert f"| {before['heldout_kl']:.6g} | {after['heldout_kl']:.6g} |" in text
    assert f"{math.exp(after['heldout_lm_loss']):.6g}" in text
    assert "kd: KL(teacher || student)" in text and "full fine-tuning" in text and "| sequence length | 32 |" in text
    assert "0.001 peak (AdamW), 10% linear warm-up" in text
    assert "1,536 of 1,536 requested (12 steps of 4 sequences x 32 tokens)" in text
    assert "resumed once from step 4" in text and "not finished" not in text
    assert "| teacher | given as a Python object |" in text and "no KL" not in text
    png = out / "report" / "loss.png"
    assert png.read_bytes().startswith(PNG) and png.stat().st_size > 5000

    fig = recovery_report.plot_loss_curves(recovery_report.load_recovery(out), tmp_path / "loss.png")
    lines = _lines_by_label(fig)
    assert lines["training loss"] == pytest.approx(_logged(curve, "train_loss"))
    assert lines["held-out next-token loss"] == pytest.approx(_logged(curve, "heldout_lm_loss"))
    assert lines["held-out KL(teacher || student)"] == pytest.approx(_logged(curve, "heldout_kl"))
    assert _logged(curve, "heldout_kl")[::2] == [0, 512, 1024, 1536]
    assert (tmp_path / "loss.png").read_bytes() == png.read_bytes()  # the same data drawn the same way
    labels = " ".join(ax.get_ylabel() for ax in fig.axes)
    assert labels.count("nats/token") == 3 and all(ax.get_xlabel() == "tokens seen" for ax in fig.axes)


def test_a_folder_of_neither_kind_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("nothing to report")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not a search run directory" in err and "recovery folder" in err
    assert "selfprune search --out" in err and "selfprune recover --out" in err
    assert not (tmp_path / "report").exists()


# -- a short recovery of a finished search's best model ---------------------------------------------------------

@pytest.fixture(scope="module")
def search_run(tmp_path_factory, data_dir):
    """A finished one-evaluation uniform search on a tiny random Llama, run by the real `selfprune search`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("search")
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512, eos_token_id=len(tokenizer) - 1,
                                         pad_token_id=len(tokenizer) - 1))
    dense.save_pretrained(folder / "dense")
    tokenizer.save_pretrained(folder / "dense")
    run = folder / "run"
    assert main(["search", "--model", str(folder / "dense"), "--target", "0.3", "--criterion", "flap",
                 "--seq-len", "32", "--fitness-windows", "4", "--fitness-dataset", "ptb", "--calib-samples", "8",
                 "--data-dir", str(data_dir), "--device", "cpu", "--no-progress", "--operator", "uniform",
                 "--budget", "1", "--out", str(run)]) == 0
    return {"run": run, "dense": folder / "dense"}


def test_recover_search_model_into_a_sibling_folder(search_run, text_file, data_dir, tmp_path, capsys):
    run, model_dir = search_run["run"], search_run["run"] / "model"
    model_files = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    settings = dict(method="lm", data=str(text_file), eval_every=5, checkpoint_every=5, **FAST)
    with pytest.raises(Stop):  # killed after its checkpoint at step 5
        recover_search_model(model_dir, str(search_run["dense"]), 20 * 4 * 32, data_dir, progress=False,
                             on_step=_stop_at(7), **settings)
    assert (recovered_model_dir(model_dir) / "recovery_run.json").is_file()
    facts = recover_search_model(model_dir, str(search_run["dense"]), 20 * 4 * 32, data_dir, progress=False,
                                 **settings)
    out = run / "model-recovered"
    assert facts["path"] == str(out) and facts["resumed_from_step"] == 5 and not facts["reused"]
    assert facts["tokens"] == 2560 and facts["steps"] == 20 and facts["method"] == "lm"
    loss = facts["heldout_lm_loss"]
    assert loss["after"] < loss["before"] - 0.1, loss
    assert set(facts["heldout_kl"]) == {"before", "after"}  # the teacher was given: KL measured too
    # the search's own model is untouched; the recovered one reloads with the same structure
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == model_files
    recovered, tokenizer = selfprune.load(out)
    pruned, _ = selfprune.load(model_dir)
    shapes = lambda model: {k: v.shape for k, v in model.state_dict().items()}
    assert shapes(recovered) == shapes(pruned)
    heldout = load_training_data(tokenizer, str(text_file), "validation", 32, 8).heldout
    assert heldout_metrics(recovered, None, heldout)["heldout_lm_loss"] == pytest.approx(loss["after"], rel=1e-5)
    recorded = json.loads((out / "config.json").read_text())["selfprune"]["recovery"]
    assert recorded["sources"]["model"] == str(model_dir) and recorded["sources"]["model_fingerprint"]

    # again with the same settings: the recorded facts, no training; other settings: recovered afresh
    again = recover_search_model(model_dir, str(search_run["dense"]), 20 * 4 * 32, data_dir, progress=False,
                                 **settings)
    assert again["reused"] and again["heldout_lm_loss"] == loss and again["train_seconds"] == facts["train_seconds"]
    shorter = recover_search_model(model_dir, str(search_run["dense"]), 2 * 4 * 32, data_dir, progress=False,
                                   **settings)
    assert not shorter["reused"] and shorter["steps"] == 2 and shorter["resumed_from_step"] == 0

    # the recovered folder gets a recovery report, the run folder still a search report (with the facts)
    assert main(["report", str(out)]) == 0
    assert "| step | tokens seen |" in (out / "report" / "report.md").read_text()
    summary_file = run / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps(summary | {"recovery": shorter}))  # as `search --recover-tokens` records it
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert "rates.png" in capsys.readouterr().out
    text = (run / "report" / "report.md").read_text()
    assert "# Search report" in text and (run / "report" / "fitness.png").read_bytes().startswith(PNG)
    assert f"| recovered model | `{out}`: held-out loss {shorter['heldout_lm_loss']['before']:.6g} -> " in text

    # a pruned model that was never recovered is neither kind of folder
    assert main(["report", str(model_dir)]) == 2
    assert "not a search run directory" in capsys.readouterr().err


def test_recover_search_model_refuses_bad_input_before_loading(search_run, tmp_path):
    from selfprune.errors import SelfpruneError

    with pytest.raises(SelfpruneError, match="no saved model"):
        recover_search_model(tmp_path / "model", "default", 10_000)
    with pytest.raises(SelfpruneError, match="less than one optimizer step"):
        recover_search_model(search_run["run"] / "model", "default", 100)
    with pytest.raises(SelfpruneError, match="distils from a teacher"):
        recover_search_model(search_run["run"] / "model", None, 10_000)


def test_search_recover_tokens_end_to_end(search_run, data_dir, tmp_path, capsys):
    """`search --recover-tokens`: the finished run's best model is distilled into model-recovered, the summary
    records it, a resume finds nothing to do; adding it to a finished run by --resume recovers then."""
    common = ["search", "--model", str(search_run["dense"]), "--target", "0.3", "--seq-len", "32",
              "--fitness-windows", "4", "--fitness-dataset", "ptb", "--calib-samples", "8", "--data-dir", str(data_dir),
              "--device", "cpu", "--no-progress", "--operator", "uniform", "--budget", "1"]
    assert main([*common, "--out", str(tmp_path / "bad"), "--recover-tokens", "100"]) == 2
    assert "less than one training step (1024 tokens)" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "bad"), "--recover-tokens", "2048", "--no-save-model"]) == 2
    assert "drop --no-save-model" in capsys.readouterr().err and not (tmp_path / "bad").exists()

    run = tmp_path / "run"
    assert main([*common, "--out", str(run), "--recover-tokens", "2048"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    recovery = summary["recovery"]
    assert recovery["requested_tokens"] == 2048 and recovery["steps"] == 2 and recovery["method"] == "kd"
    assert recovery["path"] == str(run / "model-recovered") and (run / "model-recovered" / "config.json").is_file()
    assert all(math.isfinite(v) for v in recovery["heldout_kl"].values())  # KL to the dense teacher, before/after
    searched, _ = selfprune.load(run / "model")
    recovered, _ = selfprune.load(run / "model-recovered")
    weights = dict(searched.named_parameters())
    changed = [n for n, w in recovered.named_parameters() if w.shape == weights[n].shape and not torch.equal(w, weights[n])]
    assert changed and all(w.shape == weights[n].shape for n, w in recovered.named_parameters())  # trained, same shapes
    capsys.readouterr()
    assert main(["search", "--resume", str(run)]) == 0
    assert "is finished" in capsys.readouterr().err

    plain = tmp_path / "plain"
    assert main([*common, "--out", str(plain)]) == 0
    assert "recovery" not in json.loads((plain / "summary.json").read_text())
    assert main(["search", "--resume", str(plain), "--recover-tokens", "1024", "--no-progress"]) == 0
    later = json.loads((plain / "summary.json").read_text())["recovery"]
    assert later["requested_tokens"] == 1024 and later["steps"] == 1 and not later["reused"]
