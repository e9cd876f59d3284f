"""The ``selfprune`` command. One module per subcommand; each parses, checks cheaply, calls the library.

Every failure the user can fix is a ``SelfpruneError`` or an argparse usage error: one line on stderr,
exit status 2, nothing written. Libraries never import this package.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

from ..errors import SelfpruneError
from .common import ArgumentParser, HelpFormatter, verbosity_parent

#: Subcommands in the order --help lists them; each is a module here with ``register(subparsers)``.
SUBCOMMANDS = ("prune", "ppl", "search", "eval", "speed", "report", "recover", "imatrix", "export", "config")


def build_parser() -> ArgumentParser:
    from .. import __version__

    parent = verbosity_parent()
    parser = ArgumentParser(prog="selfprune", formatter_class=HelpFormatter, parents=[parent],
                            description="Structured pruning of LLMs with per-layer rates (Self-Pruner).")
    parser.add_argument("--version", action="version", version=f"selfprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(sub, parents=[parent])
    return parser


def quiet_libraries(verbose: bool) -> None:
    """Library notices and bars that say nothing to a user are off unless -v."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # weight loading, GGUF conversion; ours stay
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("lm_eval", "lm-eval", "datasets", "accelerate", "httpx", "openai", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # imported before main() (tests, notebooks): the env vars came too late
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    quiet_libraries(verbose)
    try:
        return args.func(args) or 0
    except SelfpruneError as exc:
        print(f"selfprune {args.command}: error: {exc.cli_message()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
