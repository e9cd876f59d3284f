"""``selfprune export``: write a dense or pruned model as a GGUF file that stock llama.cpp runs."""
from __future__ import annotations

from .common import HelpFormatter, add_overwrite_option, check_model, check_output, positive_int, say


def register(sub, parents=()):
    from ..export import DEFAULT_FFN_MULTIPLE, OUTTYPES

    p = sub.add_parser("export", parents=list(parents), formatter_class=HelpFormatter,
                       help="export to GGUF for llama.cpp (f32, f16, bf16, q8_0, q4_k_m, ...)")
    p.add_argument("--model", default="default",
                   help="local model folder (dense or pruned), hub id, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--format", default="gguf", choices=("gguf",), help="output format")
    p.add_argument("--outtype", default="f16", choices=tuple(OUTTYPES),
                   help="tensor type: f32/f16 are written directly, the others by llama.cpp's quantizer")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--tokenizer-gguf", default=None,
                   help="GGUF file whose tokenizer fields are copied (same vocabulary); if not given, the default "
                        "model's GGUF when the vocabularies match, else a BPE vocabulary built from the model's tokenizer")
    p.add_argument("--ffn-multiple", type=positive_int, default=DEFAULT_FFN_MULTIPLE,
                   help="write MLP widths padded with zero channels to a multiple of this (outputs unchanged): odd "
                        "widths make llama.cpp's quantizer keep ffn_down in F16 and its prompt kernels slower; 1 writes "
                        "the pruned widths as they are")
    p.add_argument("--threads", type=positive_int, default=None, help="quantizer threads; if not given, all cores")
    add_overwrite_option(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..export import check_gguf_file, export_gguf, layer_shapes
    from ..io import run_lock
    from ..models import load_model

    out = check_output(args.out, kind="file", overwrite=args.overwrite)
    if args.tokenizer_gguf:
        check_gguf_file(args.tokenizer_gguf)
    check_model(args.model)
    with run_lock(out):  # a second export to the same file is refused at once
        model, tokenizer = load_model(args.model, "float32", "cpu")
        path = export_gguf(model, tokenizer, out, args.outtype, tokenizer_gguf=args.tokenizer_gguf,
                           overwrite=args.overwrite, threads=args.threads or 0, ffn_multiple=args.ffn_multiple)
    shapes = layer_shapes(model, args.ffn_multiple)
    say(f"per-layer query heads {[s.heads for s in shapes]}, MLP widths {[s.ffn for s in shapes]}"
        + (f" ({sum(s.padded_channels for s in shapes)} zero channels added to reach multiples of {args.ffn_multiple})"
           if any(s.padded_channels for s in shapes) else ""))
    print(f"{path}: {args.outtype} GGUF (llama.cpp architecture 'deci'), {path.stat().st_size / 2**20:.1f} MiB")
    return 0
