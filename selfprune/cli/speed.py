"""``selfprune speed``: prefill throughput, decode latency, memory and FLOPs, pruned vs dense in one run."""
from __future__ import annotations

from .common import (HelpFormatter, add_engine_options, add_json_out_options, add_model_options, check_gguf_model,
                     check_model, check_model_options, check_output, nonnegative_int, positive_int, say, locked_output)


def register(sub, parents=()):
    from ..evaluation import speed

    p = sub.add_parser("speed", parents=list(parents), formatter_class=HelpFormatter,
                       help="prefill throughput, decode latency, memory and FLOPs: pruned vs dense in one run",
                       description=speed.__doc__.split("\n\n")[0] + "\n\n" + speed.__doc__.split("\n\n")[1])
    add_model_options(p, model_default=None,
                      model_help="the pruned model: folder, .gguf file, hub id, or 'default'")
    p.add_argument("--baseline", required=True, help="the dense model to compare with (same forms as --model)")
    p.add_argument("--sweep", default="1x128,8x128", help="prefill settings BATCHxSEQLEN, comma-separated (torch; llama.cpp "
                                                          "prefills one --prompt-len prompt)")
    p.add_argument("--decode-tokens", type=nonnegative_int, default=32, help="tokens generated per decode run (0: skip decode)")
    p.add_argument("--prompt-len", type=positive_int, default=128, help="prompt length before the decode run")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per setting and model (median reported)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed runs per setting and model first")
    add_engine_options(p)
    add_json_out_options(p, "the full results")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    check_model_options(args)
    out = check_output(args.out, kind="file", overwrite=args.overwrite) if args.out else None
    with locked_output(out):   # one writer of --out at a time; a killed one's leftovers go
        return _run(args, out)


def _run(args, out) -> int:
    import torch
    from ..errors import SelfpruneError
    from ..evaluation.speed import compare_speed, format_speed, parse_sweep
    from ..io import atomic_write_json
    from ..models import load_model

    if args.engine == "llama.cpp":
        return _run_llama_cpp(args, out)
    sweep = parse_sweep(args.sweep)
    if not sweep and args.decode_tokens < 1:
        raise SelfpruneError("nothing to measure: give at least one --sweep setting or --decode-tokens >= 1")
    lengths = {"--sweep length": max((s for _, s in sweep), default=0),
               "--prompt-len + --decode-tokens": args.prompt_len + args.decode_tokens}
    for spec in (args.model, args.baseline):
        check_model(spec, lengths)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    placement = {"max_memory": args.max_memory, "offload_dir": args.offload_dir}
    model, _ = load_model(args.model, args.dtype, args.device, args.device_map, **placement)
    baseline, _ = load_model(args.baseline, args.dtype, args.device, args.device_map, **placement)
    say(f"timing {args.model} against {args.baseline}: {len(sweep)} prefill settings"
        f"{' + decode' if args.decode_tokens else ''}, {args.warmup} warm-up + {args.repeats} timed runs each")
    result = compare_speed(model, baseline, sweep=sweep, decode_tokens=args.decode_tokens, prompt_len=args.prompt_len,
                           warmup=args.warmup, repeats=args.repeats, progress=True)
    result |= {"model": args.model, "baseline": args.baseline, "dtype": args.dtype}
    print(format_speed(result))
    if out:
        atomic_write_json(out, result)
        print(f"wrote {out}")
    return 0


def _run_llama_cpp(args, out) -> int:
    """Both .gguf files through llama.cpp's runtime, interleaved, at each thread count."""
    from ..errors import SelfpruneError
    from ..evaluation.llamacpp import compare_speed_gguf, format_speed_gguf
    from ..io import atomic_write_json

    if args.decode_tokens < 1:
        raise SelfpruneError("--engine llama.cpp measures prefill and decode: give --decode-tokens 1 or more")
    for spec, option in ((args.model, "--model"), (args.baseline, "--baseline")):
        check_gguf_model(spec, option)
        check_model(spec, {"--prompt-len + --decode-tokens": args.prompt_len + args.decode_tokens})
    say(f"timing {args.model} against {args.baseline} in llama.cpp: {args.warmup} warm-up + {args.repeats} timed runs")
    result = compare_speed_gguf(args.model, args.baseline, threads=[args.threads] if args.threads else (1, 2),
                                prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, warmup=args.warmup,
                                repeats=args.repeats)
    result |= {"model": args.model, "baseline": args.baseline, "engine": "llama.cpp"}
    print(format_speed_gguf(result))
    if out:
        atomic_write_json(out, result)
        print(f"wrote {out}")
    return 0
