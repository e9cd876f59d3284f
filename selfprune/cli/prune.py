"""``selfprune prune``: prune with one rate or per-layer rates, report dense vs pruned perplexity, save."""
from __future__ import annotations

from ..errors import SelfpruneError
from .common import (HelpFormatter, add_calibration_options, add_data_option, add_model_options, add_overwrite_option,
                     add_pruning_options, calibration_config, check_model, check_model_options, check_output,
                     positive_int, rate_fraction, read_rates_file, say)

PPL_DATASETS = ("wikitext2", "ptb", "c4", "none")


def register(sub, parents=()):
    p = sub.add_parser("prune", parents=list(parents), formatter_class=HelpFormatter,
                       help="prune a model with one rate or per-layer rates and save it",
                       description="Prune whole attention heads and MLP channels; save a smaller model that reloads "
                                   "with transformers.")
    add_model_options(p)
    p.add_argument("--rate", type=rate_fraction, default=None,
                   help="fraction of every decoder layer's attention+MLP parameters to remove (or give --rates)")
    p.add_argument("--rates", default=None, help="JSON file with one rate per decoder layer (or a search's best.json)")
    p.add_argument("--out", required=True, help="folder to write the pruned model to")
    add_overwrite_option(p)
    add_pruning_options(p)
    p.add_argument("--sequential", action="store_true",
                   help="--reconstruct lstsq: fit layer i on the outputs of layers 0..i-1 already pruned and refit "
                        "(SlimGPT / OSSCAR) instead of on the dense model's activations")
    add_calibration_options(p)
    p.add_argument("--save-imatrix", action="store_true",
                   help="also save the pruned model's importance matrix (imatrix.gguf, on the calibration text): "
                        "selfprune export then gives it to llama.cpp's quantizer")
    p.add_argument("--ppl-dataset", default="wikitext2",
                   help=f"report dense vs pruned perplexity on this text: {', '.join(PPL_DATASETS)} or a .txt/.jsonl path")
    p.add_argument("--ppl-split", default="test", choices=("test", "validation"), help="split for the perplexity report")
    p.add_argument("--seq-len", type=positive_int, default=128, help="perplexity window length")
    p.add_argument("--max-windows", type=positive_int, default=None,
                   help="cap on perplexity windows; if not given, the whole split")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    add_data_option(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..accounting import validate_rates
    from ..data import check_text_available
    from ..io import run_lock

    check_model_options(args)
    if args.sequential and args.reconstruct != "lstsq":
        raise SelfpruneError("--sequential changes how a least-squares refit is calibrated: add --reconstruct lstsq")
    if (args.rate is None) == (args.rates is None):
        raise SelfpruneError("give exactly one of --rate (one rate for every layer) or --rates FILE (one per layer)")
    rates = read_rates_file(args.rates) if args.rates else None
    out = check_output(args.out, kind="dir", overwrite=args.overwrite)
    lengths = {"--calib-seq-len": args.calib_seq_len} | ({"--seq-len": args.seq_len} if args.ppl_dataset != "none" else {})
    config = check_model(args.model, lengths)
    layers = config.get("text_config", config).get("num_hidden_layers")
    if rates is not None and layers:
        validate_rates(rates, layers)  # wrong length / out of range before the model loads
    if args.ppl_dataset != "none":
        check_text_available(args.ppl_dataset, args.ppl_split, args.data_dir)
    check_text_available(args.calib_dataset, args.calib_split, args.data_dir)
    with run_lock(out):  # a second prune into the same folder is refused at once, not after calibrating
        return _prune(args, rates, out)


def _prune(args, rates, out) -> int:
    from ..accounting import validate_rates
    from ..models import load_model
    from ..pruned_format import reload_hint, save_pruned
    from ..pruning import Pruner

    evaluator = None
    calibration = calibration_config(args)
    model, tokenizer = load_model(args.model, args.dtype, args.device, args.device_map, max_memory=args.max_memory,
                                  offload_dir=args.offload_dir)
    if args.ppl_dataset != "none":  # the text is read before the slow calibration: a missing file fails now
        from ..evaluation.perplexity import PerplexityEvaluator

        evaluator = PerplexityEvaluator(tokenizer, args.ppl_dataset, args.ppl_split, args.seq_len, args.max_windows,
                                        args.batch_size, args.data_dir, progress=True)
    from ..adapters import get_adapter

    num_layers = get_adapter(model).num_layers
    rates = validate_rates(rates if rates is not None else [args.rate] * num_layers, num_layers)
    compensation = {"auto": None, "on": True, "off": False}[args.bias_compensation]
    pruner = Pruner(model, tokenizer, args.criterion, calibration, args.gqa_policy, args.mlp_multiple,
                    compensation, True, args.structure, reconstruct=args.reconstruct, sequential=args.sequential,
                    ridge=args.ridge)
    pruned, report = pruner.build(rates)
    result = {"model": args.model, "report": report.to_dict()}
    print(report.summary())
    if evaluator is not None:
        dense_ppl = evaluator(model)
        pruned_ppl = evaluator(pruned)
        result["perplexity"] = {"dense": dense_ppl, "pruned": pruned_ppl}
        s = evaluator.settings
        print(f"perplexity on {s['dataset']}/{s['split']} (seq-len {s['seq_len']}, {s['predicted_tokens']:,} predicted "
              f"tokens): dense {dense_ppl['ppl']:.2f} -> pruned {pruned_ppl['ppl']:.2f}")
    imatrix = None
    if args.save_imatrix:
        from ..imatrix import collect_imatrix

        imatrix = collect_imatrix(pruned, tokenizer, calibration, progress=True)
    save_pruned(pruned, tokenizer, out, result, overwrite=args.overwrite, imatrix=imatrix)
    print(f"saved the pruned model to {out}" + (" with its importance matrix (imatrix.gguf)" if imatrix else ""))
    say(reload_hint(out))
    return 0
