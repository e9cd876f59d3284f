"""``selfprune recover``: distil a pruned model from its dense parent (or fine-tune it), fully or with LoRA."""
from __future__ import annotations

import argparse

from ..errors import SelfpruneError
from .common import (HelpFormatter, add_data_option, add_model_options, add_overwrite_option, check_output,
                     check_model, nonnegative_float, nonnegative_int, positive_float, positive_int, say)

_SUFFIXES = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}


def token_count(text: str) -> int:
    """'500k', '0.5M', '100000' -> a whole number of tokens."""
    value = text.strip().lower().replace("_", "")
    scale = _SUFFIXES.get(value[-1:], 1)
    try:
        number = float(value[:-1] if scale != 1 else value) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 100000, 500k, 0.5M)") from None
    if number != number or number < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count (e.g. 100000, 500k, 0.5M)")
    return int(number)


token_count.__name__ = "a token count"


def register(sub, parents=()):
    from ..recovery import METHODS

    p = sub.add_parser("recover", parents=list(parents), formatter_class=HelpFormatter,
                       help="recover a pruned model by distillation from its dense parent (full or LoRA)",
                       description="Train a pruned model towards its dense teacher (KL on next-token distributions) "
                                   "or on next-token loss, on the C4 sample or your text; resumable after a kill.")
    add_model_options(p, model_help="the pruned model folder to recover (not needed with --resume)")
    for action in p._actions:  # --model is required unless --resume names the run
        if action.dest == "model":
            action.required, action.default = False, None
    p.add_argument("--teacher", default="default",
                   help="the dense model the student was pruned from (hub id, folder, .gguf, 'default'), or 'none' with "
                        "--method lm (then no KL is measured)")
    p.add_argument("--teacher-device-map", default=None,
                   help="transformers device_map for the teacher; if not given, the teacher goes on --device")
    p.add_argument("--method", default="kd", choices=METHODS,
                   help="kd: KL(teacher || student); lm: next-token loss; mix: --kd-weight x kd + the rest lm")
    p.add_argument("--tokens", type=token_count, default=100_000, help="training tokens (e.g. 100k, 0.5M)")
    p.add_argument("--data", default="c4", help="training text: c4 (the sample in the data folder) or a .txt/.jsonl path")
    p.add_argument("--data-split", default="validation", choices=("validation", "test"),
                   help="split of --data (test splits of wikitext2 / ptb are refused)")
    p.add_argument("--seq-len", type=positive_int, default=128, help="tokens per packed training sequence")
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--learning-rate", "--lr", type=positive_float, default=None,
                   help="peak AdamW learning rate; if not given, 3e-4 for full fine-tuning, 5e-4 with LoRA")
    p.add_argument("--warmup-ratio", type=nonnegative_float, default=0.05, help="share of steps with linear warm-up")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=positive_float, default=1.0, help="gradient clipping norm")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="distillation temperature")
    p.add_argument("--kd-weight", type=nonnegative_float, default=0.5, help="share of the KD term with --method mix")
    p.add_argument("--lora-rank", type=nonnegative_int, default=0,
                   help="LoRA rank on q/k/v/o and gate/up/down (merged at the end); 0 trains every weight")
    p.add_argument("--lora-alpha", type=positive_float, default=None, help="LoRA alpha; if not given, 2 x rank")
    p.add_argument("--heldout-sequences", type=positive_int, default=32,
                   help="sequences at the end of the data never trained on, for the held-out loss")
    p.add_argument("--eval-every", type=positive_int, default=25, help="optimizer steps between held-out evaluations")
    p.add_argument("--log-every", type=positive_int, default=5, help="optimizer steps between log lines")
    p.add_argument("--checkpoint-every", type=positive_int, default=25, help="optimizer steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="seed for the data order and LoRA initialisation")
    p.add_argument("--out", default=None, help="folder for the run and, at the end, the recovered model")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a killed run from its folder (all other options are read from it)")
    add_overwrite_option(p)
    add_data_option(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..recovery import RecoveryConfig, recover_from_specs, resume_run

    if args.resume:
        if args.out or args.model:
            raise SelfpruneError("--resume reads the model, the output folder and the settings from the run: "
                                 "give --resume RUN_DIR alone")
        model, summary = resume_run(args.resume)
        out = args.resume
    else:
        if not args.model or not args.out:
            raise SelfpruneError("give --model PRUNED_DIR and --out FOLDER (or --resume RUN_DIR)")
        if args.max_memory is not None or args.offload_dir is not None:
            flag = "--max-memory" if args.max_memory is not None else "--offload-dir"
            raise SelfpruneError(f"{flag} places weights for inference (offloaded weights cannot be trained): "
                                 "recover with the student on --device, or spread it over GPUs with --device-map")
        check_output(args.out, kind="dir", overwrite=args.overwrite)
        check_model(args.model, {"--seq-len": args.seq_len})
        config = RecoveryConfig(
            method=args.method, tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
            grad_accum=args.grad_accum, learning_rate=args.learning_rate, warmup_ratio=args.warmup_ratio,
            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, temperature=args.temperature,
            kd_weight=args.kd_weight, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, data=args.data,
            data_split=args.data_split, heldout_sequences=args.heldout_sequences, eval_every=args.eval_every,
            log_every=args.log_every, checkpoint_every=args.checkpoint_every, seed=args.seed)
        say(f"recovering {args.model} ({config.method}, {config.total_steps} steps of {config.tokens_per_step} "
            f"tokens{f', LoRA rank {config.lora_rank}' if config.lora_rank else ''}) into {args.out}")
        model, summary = recover_from_specs(
            args.model, args.out, teacher=args.teacher if args.teacher != "none" else None, config=config,
            data_dir=args.data_dir, dtype=args.dtype, device=args.device, device_map=args.device_map,
            teacher_device_map=args.teacher_device_map, overwrite=args.overwrite)
        out = args.out
    before, after = summary["initial"], summary["final"]
    line = f"held-out loss {before['heldout_lm_loss']:.4f} -> {after['heldout_lm_loss']:.4f}"
    if "heldout_kl" in after:
        line += f", KL to teacher {before['heldout_kl']:.4f} -> {after['heldout_kl']:.4f}"
    print(f"{out}: {line} ({summary['tokens']:,} tokens, {summary['train_seconds']:.0f} s training)")
    return 0
