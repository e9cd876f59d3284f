"""``selfprune eval``: zero-shot accuracy (lm-eval) of a dense or pruned model on the seven tasks."""
from __future__ import annotations

from .common import (HelpFormatter, add_data_option, add_model_options, add_json_out_options, check_model_options,
                     check_output, positive_int, locked_output)


def register(sub, parents=()):
    from ..evaluation.zero_shot import SOURCES, TASKS

    p = sub.add_parser("eval", parents=list(parents), formatter_class=HelpFormatter,
                       help="zero-shot accuracy (lm-eval) on BoolQ, PIQA, HellaSwag, WinoGrande, ARC-e/c, OpenBookQA",
                       description="Zero-shot accuracy through lm-eval's HF wrapper around the model object, so "
                                   "pruned models work. Reported metric: acc for BoolQ and WinoGrande, acc_norm for "
                                   "the others. Use --limit 500 or more: fewer items per task are noise.")
    add_model_options(p)
    p.add_argument("--tasks", default="all", help=f"'all' or a comma list from {','.join(TASKS)}")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate the first N items of each task; if not given, every item")
    p.add_argument("--batch-size", type=positive_int, default=8, help="requests per forward pass")
    p.add_argument("--source", choices=SOURCES, default="auto",
                   help="local copies (the data folder), lm-eval's hub tasks, or auto (local when a data folder is set)")
    p.add_argument("--seed", type=int, default=0, help="seed of lm-eval's random choices")
    add_json_out_options(p, "the results")
    add_data_option(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    check_model_options(args)
    out = check_output(args.out, kind="file", overwrite=args.overwrite) if args.out else None
    with locked_output(out):   # one writer of --out at a time; a killed one's leftovers go
        return _run(args, out)


def _run(args, out) -> int:
    from ..evaluation.zero_shot import check_local_files, evaluate_zero_shot, format_table, parse_tasks, resolve_source
    from ..io import atomic_write_json
    from ..models import load_model
    from ..offload import input_device

    names = parse_tasks(args.tasks)  # bad task names or missing data fail before the (slow) model load
    source, directory = resolve_source(args.source, args.data_dir)
    if source == "local":
        check_local_files(names, directory)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                                  max_memory=args.max_memory, offload_dir=args.offload_dir)
    results = evaluate_zero_shot(model, tokenizer, names, limit=args.limit, data_dir=directory,
                                 batch_size=args.batch_size, seed=args.seed, source=source)
    results["model"] = args.model
    results["settings"].update(dtype=args.dtype, device=str(input_device(model)))
    print(format_table(results))
    if out:
        atomic_write_json(out, results)
        print(f"wrote {out}")
    return 0
