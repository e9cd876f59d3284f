"""``selfprune export``: write a dense or pruned model as a GGUF file that stock llama.cpp runs."""
from __future__ import annotations

from pathlib import Path

from ..errors import SelfpruneError
from .common import (HelpFormatter, add_calibration_options, add_overwrite_option, calibration_config, check_model,
                     check_output, positive_int, say)


def register(sub, parents=()):
    from ..export import DEFAULT_FFN_MULTIPLE, OUTTYPES
    from ..export.quantize import NEEDS_IMATRIX

    p = sub.add_parser("export", parents=list(parents), formatter_class=HelpFormatter,
                       help="export to GGUF for llama.cpp (f16, q8_0, q4_k_m, q3_k_m, iq4_xs, ...)")
    p.add_argument("--model", default="default",
                   help="local model folder (dense or pruned), hub id, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--format", default="gguf", choices=("gguf",), help="output format")
    p.add_argument("--outtype", default="f16", choices=tuple(OUTTYPES), metavar="OUTTYPE",
                   help="llama-quantize's presets: f32/f16 are written directly, the others by llama.cpp's quantizer "
                        f"with its per-tensor rules ({', '.join(OUTTYPES)}; {', '.join(NEEDS_IMATRIX)} need an "
                        "importance matrix)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--imatrix", default=None, metavar="FILE",
                   help="importance matrix for the quantizer (selfprune imatrix's or llama-imatrix's file). It "
                        "weights each tensor's rounding error by how much its input columns carry, so the file has the "
                        "same size and types (llama.cpp's presets change a few types with one: q4_0 / q5_0 keep "
                        "ffn_down of the first eighth of the layers in q4_1 / q5_1) and a lower error, most at 2-3 "
                        "bits. If not given: the model folder's imatrix.gguf (prune or search --save-imatrix) when there is one")
    p.add_argument("--calibrate", action="store_true",
                   help="compute the importance matrix now, on the calibration text (--calib-*)")
    p.add_argument("--no-imatrix", action="store_true", help="quantize without an importance matrix")
    p.add_argument("--tensor-types", default=None, metavar="RULES",
                   help="per-tensor types over the preset: pattern=type,... or a file of such lines; the first regular "
                        "expression found in a tensor's name wins (e.g. 'ffn_down=q6_k,blk\\.0\\.=q8_0'; names as in "
                        "llama.cpp: token_embd, blk.N.attn_q/k/v/output, blk.N.ffn_gate/up/down)")
    p.add_argument("--tokenizer-gguf", default=None,
                   help="GGUF file whose tokenizer fields are copied (same vocabulary); if not given, the default "
                        "model's GGUF when the vocabularies match, else a BPE vocabulary built from the model's tokenizer")
    p.add_argument("--ffn-multiple", type=positive_int, default=DEFAULT_FFN_MULTIPLE,
                   help="write MLP widths padded with zero channels to a multiple of this (outputs unchanged): odd "
                        "widths make llama.cpp's quantizer keep ffn_down in F16 and its prompt kernels slower; 1 writes "
                        "the pruned widths as they are")
    p.add_argument("--threads", type=positive_int, default=None, help="quantizer threads; if not given, all cores")
    add_calibration_options(p)
    p.add_argument("--data-dir", default=None, help="folder with local copies of the calibration text (--calibrate)")
    add_overwrite_option(p)
    p.set_defaults(func=run)
    return p


def _imatrix_choice(args):
    """(how, file): the importance matrix this export uses, decided before the model loads."""
    from ..export.quantize import NEEDS_IMATRIX
    from ..imatrix import IMATRIX_FILE

    given = [flag for flag, on in (("--imatrix", args.imatrix), ("--calibrate", args.calibrate),
                                   ("--no-imatrix", args.no_imatrix)) if on]
    if len(given) > 1:
        raise SelfpruneError(f"{' and '.join(given)} exclude each other: give one")
    if args.no_imatrix:
        if args.outtype in NEEDS_IMATRIX:
            raise SelfpruneError(f"{args.outtype} needs an importance matrix: drop --no-imatrix, or choose q2_k / "
                                 "q3_k_s / iq4_xs")
        return None, None
    if args.imatrix:
        return "file", Path(args.imatrix).expanduser()
    if args.calibrate:
        return "calibrate", None
    beside = Path(args.model).expanduser() / IMATRIX_FILE
    if beside.is_file():
        return "file", beside
    if args.outtype in NEEDS_IMATRIX:
        raise SelfpruneError(f"{args.outtype} needs an importance matrix: pass --imatrix FILE or --calibrate")
    return None, None


def run(args) -> int:
    from ..data import check_text_available
    from ..export import check_gguf_file, export_gguf
    from ..export.quantize import ImportanceMatrix, parse_tensor_types
    from ..io import output_lock
    from ..models import load_model

    out = check_output(args.out, kind="file", overwrite=args.overwrite)
    if args.tokenizer_gguf:
        check_gguf_file(args.tokenizer_gguf)
    tensor_types = parse_tensor_types(args.tensor_types)
    how, imatrix_file = _imatrix_choice(args)
    imatrix = ImportanceMatrix.load(imatrix_file) if how == "file" else None
    check_model(args.model, {"--calib-seq-len": args.calib_seq_len} if how == "calibrate" else None)
    if how == "calibrate":
        check_text_available(args.calib_dataset, args.calib_split, args.data_dir)
    with output_lock(out):  # a second export to the same file is refused at once
        model, tokenizer = load_model(args.model, "float32", "cpu")
        if how == "calibrate":
            from ..imatrix import collect_imatrix

            imatrix = collect_imatrix(model, tokenizer, calibration_config(args), progress=True)
        path = export_gguf(model, tokenizer, out, args.outtype, tokenizer_gguf=args.tokenizer_gguf,
                           overwrite=args.overwrite, threads=args.threads or 0, ffn_multiple=args.ffn_multiple,
                           imatrix=imatrix, tensor_types=tensor_types,
                           imatrix_source=str(imatrix_file) if imatrix_file else None)
    if imatrix is not None:
        say(f"importance matrix: {imatrix_file or 'computed now'} ({imatrix.tokens:,} tokens)")
    say(_shape_summary(model, args.ffn_multiple))
    print(f"{path}: {args.outtype} GGUF (llama.cpp architecture '{_architecture(model)}'), "
          f"{path.stat().st_size / 2**20:.1f} MiB")
    return 0


def _architecture(model) -> str:
    from ..adapters import get_adapter
    from ..export.gguf_export import ARCH, PADDED_FAMILIES, padded_writer

    family = get_adapter(model).model_type
    return padded_writer(family).architecture(model) if family in PADDED_FAMILIES else ARCH


def _shape_summary(model, ffn_multiple: int) -> str:
    """What the file's layers look like: per-layer widths (deci), or the one padded shape of other graphs."""
    from ..adapters import get_adapter
    from ..export import layer_shapes
    from ..export.gguf_export import PADDED_FAMILIES, padded_writer

    family = get_adapter(model).model_type
    if family in PADDED_FAMILIES:
        writer = padded_writer(family)
        cost = writer.padding_cost(model, ffn_multiple)
        return (f"llama.cpp's {writer.architecture(model)} graph takes one shape for every layer: {model.config.num_attention_heads} "
                f"query heads, MLP width {cost['ffn']} ({cost['zero_parameters']:,} zero parameters of padding)")
    shapes = layer_shapes(model, ffn_multiple)
    return (f"per-layer query heads {[s.heads for s in shapes]}, MLP widths {[s.ffn for s in shapes]}"
            + (f" ({sum(s.padded_channels for s in shapes)} zero channels added to reach multiples of {ffn_multiple})"
               if any(s.padded_channels for s in shapes) else ""))
