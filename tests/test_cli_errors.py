"""Bad input across every subcommand: exit code 2, one line on stderr naming the problem, no traceback,
nothing written. Plus: every default that --help shows is the parser's real default.

Each case runs the real CLI (``selfprune.cli.main``) in-process against real files: tiny random-weight model
folders, a damaged safetensors file, a real loopback HTTP server that answers HTML.
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest

from conftest import byte_tokenizer, tiny_model
from selfprune.cli import build_parser, main


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Model folders: a good tiny LLaMA, one with damaged weights, one without weights, an unsupported
    architecture, and a folder that is no model at all."""
    import transformers

    root = tmp_path_factory.mktemp("models")
    good = root / "tiny"
    tiny_model("llama-gqa", vocab_size=257).save_pretrained(good)
    byte_tokenizer().save_pretrained(good)
    damaged = root / "damaged"
    shutil.copytree(good, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    no_weights = root / "no-weights"
    shutil.copytree(good, no_weights)
    (no_weights / "model.safetensors").unlink()
    gpt2 = root / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=257)).save_pretrained(gpt2)
    byte_tokenizer().save_pretrained(gpt2)
    not_a_model = root / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    return {"good": good, "damaged": damaged, "no_weights": no_weights, "gpt2": gpt2, "not_a_model": not_a_model}


@pytest.fixture(scope="module")
def html_server():
    """A real HTTP server on loopback that answers every request with an HTML page (not an OpenAI API)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _html(self):
            body = b"<html><body>It works!</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _html

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture()
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory with a few input files; the test checks nothing else appears."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("user data")
    (tmp_path / "a-file.txt").write_text("user data")
    (tmp_path / "rates-short.json").write_text("[0.1, 0.2, 0.3]")
    (tmp_path / "rates-range.json").write_text("[0.1, 0.2, 1.2, 0.1]")
    (tmp_path / "rates-nan.json").write_text("[0.1, NaN, 0.2, 0.1]")
    (tmp_path / "rates-text.json").write_text("[0.1, \"a\", 0.2, 0.1]")
    (tmp_path / "rates-bad.json").write_text("{not json")
    run = tmp_path / "run-missing-fields"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"operator": "random", "budget": 4}))
    run = tmp_path / "run-bad-json"
    run.mkdir()
    (run / "config.json").write_text("{")
    run = tmp_path / "run-garbage-journal"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"operator": "random", "budget": 4, "target": 0.2}))
    (run / "journal.jsonl").write_text("garbage\n" + json.dumps({"index": 0, "fitness": 1.0}) + "\n")
    return tmp_path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


# (name, argv, a word the message must contain). {good}, {damaged}, ... name the model folders, {html} the
# HTML server; every path is relative to the test's working directory.
CASES = [
    ("prune: no --out", ["prune", "--rate", "0.2"], "--out"),
    ("prune: --rate and --rates", ["prune", "--model", "{good}", "--rate", "0.2", "--rates", "rates-short.json", "--out", "o"], "exactly one"),
    ("prune: neither --rate nor --rates", ["prune", "--model", "{good}", "--out", "o"], "exactly one"),
    ("prune: rate above 1", ["prune", "--model", "{good}", "--rate", "1.5", "--out", "o"], "--rate"),
    ("prune: rate NaN", ["prune", "--model", "{good}", "--rate", "nan", "--out", "o"], "--rate"),
    ("prune: rate not a number", ["prune", "--model", "{good}", "--rate", "abc", "--out", "o"], "--rate"),
    ("prune: rates file missing", ["prune", "--model", "{good}", "--rates", "nope.json", "--out", "o"], "does not exist"),
    ("prune: rates file not JSON", ["prune", "--model", "{good}", "--rates", "rates-bad.json", "--out", "o"], "not valid JSON"),
    ("prune: rates of wrong length", ["prune", "--model", "{good}", "--rates", "rates-short.json", "--out", "o", "--ppl-dataset", "none"], "4 decoder layers"),
    ("prune: rate out of range in file", ["prune", "--model", "{good}", "--rates", "rates-range.json", "--out", "o"], "outside [0, 1)"),
    ("prune: NaN in rates file", ["prune", "--model", "{good}", "--rates", "rates-nan.json", "--out", "o"], "outside [0, 1)"),
    ("prune: text in rates file", ["prune", "--model", "{good}", "--rates", "rates-text.json", "--out", "o"], "is not a number"),
    ("prune: model path missing", ["prune", "--model", "./no-such-model", "--rate", "0.2", "--out", "o"], "does not exist"),
    ("prune: folder that is no model", ["prune", "--model", "{not_a_model}", "--rate", "0.2", "--out", "o"], "config.json"),
    ("prune: damaged safetensors", ["prune", "--model", "{damaged}", "--rate", "0.2", "--out", "o", "--ppl-dataset", "none"], "model.safetensors"),
    ("prune: no weights file", ["prune", "--model", "{no_weights}", "--rate", "0.2", "--out", "o", "--ppl-dataset", "none"], "weights"),
    ("prune: unsupported architecture", ["prune", "--model", "{gpt2}", "--rate", "0.2", "--out", "o", "--ppl-dataset", "none"], "supports"),
    ("prune: unknown criterion", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "o", "--criterion", "taylor"], "--criterion"),
    ("prune: unknown dtype", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "o", "--dtype", "float8"], "--dtype"),
    ("prune: existing --out", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "existing"], "already exists"),
    ("prune: --out under a file", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "a-file.txt/sub"], "is a file"),
    ("prune: --out is a file", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "a-file.txt", "--overwrite"], "not a folder"),
    ("prune: --out not writable", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "/sys/selfprune-out"], "cannot be written"),
    ("prune: batch size 0", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "o", "--batch-size", "0"], "--batch-size"),
    ("prune: negative windows", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "o", "--max-windows", "-2"], "--max-windows"),
    ("prune: zero windows", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "o", "--max-windows", "0"], "--max-windows"),
    ("prune: zero calibration samples", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "o", "--calib-samples", "0"], "--calib-samples"),
    ("prune: window beyond the context", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "o", "--seq-len", "100000"], "context length"),
    ("prune: unknown perplexity dataset", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "o", "--ppl-dataset", "imdb"], "unknown dataset"),
    ("prune: --sequential without --reconstruct lstsq", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "o", "--sequential"], "--reconstruct lstsq"),
    ("prune: negative --ridge", ["prune", "--model", "{good}", "--rate", "0.2", "--out", "o", "--reconstruct", "lstsq", "--ridge", "-1"], "--ridge"),
    ("search: unknown --reconstruct", ["search", "--target", "0.3", "--reconstruct", "ols", "--out", "r"], "--reconstruct"),
    ("ppl: unknown dataset", ["ppl", "--model", "{good}", "--dataset", "imdb"], "unknown dataset"),
    ("ppl: unknown split", ["ppl", "--model", "{good}", "--split", "train"], "--split"),
    ("ppl: c4 has no test split", ["ppl", "--model", "{good}", "--dataset", "c4", "--split", "test"], "no test split"),
    ("ppl: --out is a folder", ["ppl", "--model", "{good}", "--out", "existing", "--overwrite"], "is a folder"),
    ("ppl: existing --out file", ["ppl", "--model", "{good}", "--out", "a-file.txt"], "already exists"),
    ("ppl: window beyond the context", ["ppl", "--model", "{good}", "--seq-len", "100000", "--max-windows", "1"], "context length"),
    ("ppl: data folder missing", ["ppl", "--model", "{good}", "--data-dir", "no-such-data"], "does not exist"),
    ("ppl: missing text file", ["ppl", "--model", "{good}", "--dataset", "texts/none.txt"], "does not exist"),
    ("search: no target", ["search", "--operator", "random", "--out", "r"], "--target"),
    ("search: target above 1", ["search", "--target", "1.5", "--out", "r"], "--target"),
    ("search: inverted bounds", ["search", "--target", "0.3", "--bounds", "0.5,0.4", "--out", "r"], "bounds"),
    ("search: zero budget", ["search", "--target", "0.3", "--budget", "0", "--out", "r"], "--budget"),
    ("search: bad owl lambda", ["search", "--target", "0.3", "--owl-lambda", "abc", "--out", "r"], "--owl-lambda"),
    ("search: existing --out", ["search", "--target", "0.3", "--operator", "random", "--out", "existing"], "already exists"),
    ("search: window beyond the context", ["search", "--model", "{good}", "--target", "0.3", "--operator", "random", "--seq-len", "1000000", "--out", "r"], "context length"),
    ("search: resume a missing run", ["search", "--resume", "no-such-run"], "no search run"),
    ("search: resume a config without fields", ["search", "--resume", "run-missing-fields"], "lacks"),
    ("search: resume a config that is no JSON", ["search", "--resume", "run-bad-json"], "not valid JSON"),
    ("search: unreachable LLM server", ["search", "--model", "{good}", "--target", "0.3", "--operator", "llm", "--llm", "openai:m", "--llm-base-url", "http://127.0.0.1:9/v1", "--out", "r"], "127.0.0.1:9"),
    ("search: LLM server answers HTML", ["search", "--model", "{good}", "--target", "0.3", "--operator", "llm", "--llm", "openai:m", "--llm-base-url", "{html}", "--out", "r"], "HTML"),
    ("search: credentials in the LLM URL are not echoed", ["search", "--model", "{good}", "--target", "0.3", "--operator", "llm", "--llm", "openai:m", "--llm-base-url", "http://user:sk-secret@127.0.0.1:9/v1", "--out", "r"], "127.0.0.1:9"),
    ("eval: unknown task", ["eval", "--model", "{good}", "--tasks", "boolq,nope"], "unknown task"),
    ("eval: zero limit", ["eval", "--model", "{good}", "--limit", "0"], "--limit"),
    ("eval: --out is a folder", ["eval", "--model", "{good}", "--out", "existing", "--overwrite"], "is a folder"),
    ("speed: no baseline", ["speed", "--model", "{good}"], "--baseline"),
    ("speed: bad sweep", ["speed", "--model", "{good}", "--baseline", "{good}", "--sweep", "1x"], "--sweep"),
    ("speed: sweep beyond the context", ["speed", "--model", "{good}", "--baseline", "{good}", "--sweep", "1x100000"], "context length"),
    ("speed: zero repeats", ["speed", "--model", "{good}", "--baseline", "{good}", "--repeats", "0"], "--repeats"),
    ("report: missing run", ["report", "no-such-run"], "not a folder"),
    ("report: garbage journal line", ["report", "run-garbage-journal"], "line 1"),
    ("recover: offload of a trained model", ["recover", "--model", "{good}", "--out", "o", "--device-map", "auto",
                                              "--offload-dir", "off"], "cannot be trained"),
    ("search: --recover-tokens below one step", ["search", "--model", "{good}", "--target", "0.3", "--operator", "uniform",
                                                "--recover-tokens", "10", "--out", "o"], "one training step"),
    ("config: missing data folder", ["config", "--data-dir", "no-such-data"], "not a folder"),
    ("unknown subcommand", ["distill"], "invalid choice"),
]


@pytest.mark.parametrize("name,argv,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(name, argv, needle, models, html_server, workdir, capsys,
                                                      monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-default-key")
    names = {k: str(v) for k, v in models.items()} | {"html": html_server}
    argv = [a.format(**names) if "{" in a else a for a in argv]
    before = _snapshot(workdir)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"{name}: exit code {code}, stderr:\n{err}"
    assert len(lines) == 1, f"{name}: expected one line, got:\n{err}"
    assert "Traceback" not in err and "sk-secret" not in err
    assert needle in lines[0], f"{name}: {needle!r} not in {lines[0]!r}"
    assert _snapshot(workdir) == before, f"{name}: files changed"


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"selfprune": parser, **sub.choices}


def test_every_help_default_is_the_real_default():
    for name, parser in _all_parsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS):
                continue
            assert "(default" not in action.help, f"{name} {action.option_strings[0]}: help states a default by hand"
            printed = formatter._expand_help(action)  # exactly what --help prints for this option
            shown = re.findall(r"\(default: (.*?)\)$", printed)
            if action.default in (None, False, argparse.SUPPRESS):
                assert not shown, f"{name} {action.option_strings[0]} shows a default it does not have"
            else:
                assert shown == [str(action.default)], f"{name} {action.option_strings[0]}: help {shown}, real {action.default!r}"


def test_shared_options_mean_the_same_everywhere():
    seen: dict[str, tuple] = {}
    for name, parser in _all_parsers().items():
        for action in parser._actions:
            for opt in action.option_strings:
                if opt in ("--out", "--help", "-h", "--model", "--seed", "--batch-size", "--overwrite"):
                    continue  # --out names a different kind of output per command; --model's help names its role
                if name == "search" and opt == "--seq-len":
                    continue  # the fitness window: its default comes from bench/results/fitness.md (checked below)
                fact = (action.default, tuple(action.choices or ()), getattr(action.type, "__name__", None))
                assert seen.setdefault(opt, fact) == fact, f"{opt} differs in {name}: {fact} vs {seen[opt]}"
    assert seen["--device"][0] == "auto" and seen["--calib-samples"][0] == 128
    assert seen["--seq-len"][0] == 128  # the reported perplexity's window, as FLAP and LLM-Pruner report it


def test_search_fitness_window_defaults_to_128_or_the_models_context(models, tmp_path):
    """The fitness window is 128 tokens unless the model was built for fewer; a given --seq-len is kept."""
    from selfprune.search.launch import build_config

    short = tmp_path / "short-context"  # the tiny model, its config saying it was built for 64 tokens
    shutil.copytree(models["good"], short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 64}))
    parser = _all_parsers()["search"]
    for extra, model, expected in (([], "default", 128), ([], models["good"], 128), ([], short, 64),
                                   (["--seq-len", "32"], models["good"], 32)):
        args = parser.parse_args(["--target", "0.3", "--operator", "uniform", "--model", str(model), *extra])
        assert build_config(args)["fitness"]["seq_len"] == expected


@pytest.mark.parametrize("argv", [["-v", "config"], ["config", "-v"]])
def test_verbose_before_or_after_the_subcommand(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFPRUNE_CONFIG", str(tmp_path / "config.json"))
    assert main(argv) == 0
    assert build_parser().parse_args(argv).verbose is True


def test_python_errors_name_python_arguments_and_the_cli_names_flags(tmp_path, monkeypatch, capsys):
    """The same failure speaks the caller's language: data_dir= in Python, --data-dir on the command line."""
    from selfprune.data import load_text
    from selfprune.errors import SelfpruneError

    monkeypatch.delenv("SELFPRUNE_DATA_DIR", raising=False)
    monkeypatch.setenv("SELFPRUNE_CONFIG", str(tmp_path / "none.json"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SelfpruneError) as info:
        load_text("wikitext2", "test")
    assert "data_dir=" in str(info.value) and "--data-dir" not in str(info.value).split("selfprune config")[0]
    assert info.value.cli_message().count("--data-dir") >= 1


def test_data_folder_order_argument_environment_saved_default(tmp_path, monkeypatch, capsys):
    from selfprune.data import resolve_data_dir

    saved, env, arg = (tmp_path / n for n in ("saved", "env", "arg"))
    for folder in (saved, env, arg):
        folder.mkdir()
    monkeypatch.setenv("SELFPRUNE_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.delenv("SELFPRUNE_DATA_DIR", raising=False)
    assert resolve_data_dir() is None
    assert main(["config", "--data-dir", str(saved)]) == 0
    assert resolve_data_dir() == saved
    monkeypatch.setenv("SELFPRUNE_DATA_DIR", str(env))
    assert resolve_data_dir() == env
    assert resolve_data_dir(arg) == arg
    assert oct(os.stat(tmp_path / "config.json").st_mode & 0o777) != oct(0o600)
