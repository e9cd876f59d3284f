"""``selfprune imatrix``: a model's importance matrix for llama.cpp's quantizer, in llama.cpp's file format."""
from __future__ import annotations

from .common import (HelpFormatter, add_calibration_options, add_data_option, add_overwrite_option, calibration_config,
                     check_model, check_output, say)


def register(sub, parents=()):
    p = sub.add_parser("imatrix", parents=list(parents), formatter_class=HelpFormatter,
                       help="compute a model's importance matrix (llama-imatrix's file) for low-bit GGUF export",
                       description="The per-input-column mean of squared activations of every decoder linear layer on "
                                   "the calibration text, written in llama.cpp's GGUF imatrix format: `selfprune export "
                                   "--imatrix FILE` and `llama-quantize --imatrix FILE` use it.")
    p.add_argument("--model", default="default",
                   help="local model folder (dense or pruned), hub id, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="the imatrix file to write (e.g. imatrix.gguf)")
    add_overwrite_option(p)
    add_calibration_options(p)
    add_data_option(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..data import check_text_available
    from ..imatrix import collect_imatrix
    from ..io import output_lock
    from ..models import load_model

    out = check_output(args.out, kind="file", overwrite=args.overwrite)
    check_model(args.model, {"--calib-seq-len": args.calib_seq_len})
    check_text_available(args.calib_dataset, args.calib_split, args.data_dir)
    with output_lock(out):
        model, tokenizer = load_model(args.model, "float32", "cpu")
        imatrix = collect_imatrix(model, tokenizer, calibration_config(args), progress=True)
        imatrix.save(out)
    say(f"{len(imatrix.sums)} tensors, {imatrix.tokens:,} tokens ({imatrix.datasets[0]})")
    print(f"{out}: importance matrix (llama.cpp GGUF imatrix format)")
    return 0
