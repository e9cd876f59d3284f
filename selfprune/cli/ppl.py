"""``selfprune ppl``: perplexity of a dense or pruned model in non-overlapping windows."""
from __future__ import annotations

from .common import (HelpFormatter, add_data_option, add_engine_options, add_json_out_options, add_model_options,
                     check_gguf_model, check_model, check_model_options, check_output, positive_int, say, locked_output)


def register(sub, parents=()):
    p = sub.add_parser("ppl", parents=list(parents), formatter_class=HelpFormatter,
                       help="perplexity on WikiText-2, PTB, the C4 sample or a local file")
    add_model_options(p)
    p.add_argument("--dataset", default="wikitext2", help="wikitext2, ptb, c4, or a .txt/.jsonl path")
    p.add_argument("--split", default="test", choices=("test", "validation"), help="split of the dataset")
    p.add_argument("--seq-len", type=positive_int, default=128,
                   help="window length (128 as FLAP/LLM-Pruner; 2048 as SliceGPT/OWL)")
    p.add_argument("--max-windows", type=positive_int, default=None,
                   help="cap on the number of windows; if not given, the whole split")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (torch)")
    add_engine_options(p)
    p.add_argument("--tokenizer", default=None,
                   help="llama.cpp: the Hugging Face tokenizer that cuts the windows (folder, hub id or 'default'), so "
                        "they equal PyTorch's; if not given, the default model's when the file has its vocabulary, "
                        "else llama.cpp's own")
    add_json_out_options(p, "the result")
    add_data_option(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    check_model_options(args)
    out = check_output(args.out, kind="file", overwrite=args.overwrite) if args.out else None
    with locked_output(out):   # one writer of --out at a time; a killed one's leftovers go
        return _run(args, out)


def _run(args, out) -> int:
    from ..data import check_text_available
    from ..io import atomic_write_json
    from ..models import load_model
    from ..evaluation.perplexity import PerplexityEvaluator

    check_text_available(args.dataset, args.split, args.data_dir)
    if args.engine == "llama.cpp":
        from ..evaluation.llamacpp import gguf_perplexity, tokenizer_for_gguf

        check_gguf_model(args.model)
        check_model(args.model, {"--seq-len": args.seq_len})
        result = {"model": args.model, "engine": "llama.cpp",
                  **gguf_perplexity(args.model, tokenizer_for_gguf(args.model, args.tokenizer), args.dataset,
                                    args.split, args.seq_len, args.max_windows, args.data_dir, threads=args.threads,
                                    progress=True)}
    else:
        import torch

        check_model(args.model, {"--seq-len": args.seq_len})
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        model, tokenizer = load_model(args.model, args.dtype, args.device, args.device_map,
                                      max_memory=args.max_memory, offload_dir=args.offload_dir)
        evaluator = PerplexityEvaluator(tokenizer, args.dataset, args.split, args.seq_len, args.max_windows,
                                        args.batch_size, args.data_dir, progress=True)
        if args.max_windows is None:
            say(f"scoring all {evaluator.windows.shape[0]:,} windows of {args.dataset}/{args.split}; the bar shows "
                "the time left (--max-windows N scores fewer)")
        result = {"model": args.model, "engine": "torch", **evaluator(model)}
    print(f"{args.model}: {result['dataset']}/{result['split']} perplexity {result['ppl']:.3f} "
          f"(seq-len {result['seq_len']}, {result['windows']} windows, {result['predicted_tokens']:,} predicted tokens)")
    if out:
        atomic_write_json(out, result)
    return 0
