"""``selfprune report``: a markdown report with plots for a search run or a recovery folder."""
from __future__ import annotations

from pathlib import Path

from ..errors import SelfpruneError
from .common import HelpFormatter, check_output


def register(sub, parents=()):
    from ..evaluation import report

    p = sub.add_parser("report", parents=list(parents), formatter_class=HelpFormatter,
                       help="markdown + PNG report of a search run (rates, fitness, tables, settings) or of a "
                            "recovery (settings, held-out numbers, loss curves)",
                       description=report.__doc__)
    p.add_argument("run_dir", help="the folder written by `selfprune search --out` or `selfprune recover --out` "
                                   "(a recovered model, or a recovery run still going)")
    p.add_argument("--out", default=None, help="folder for report.md and the PNGs; if not given, RUN_DIR/report")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..evaluation.recovery_report import FIGURES, is_recovery_folder
    from ..evaluation.report import build_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise SelfpruneError(f"{run_dir} is not a folder: give the folder that `selfprune search --out` or "
                             "`selfprune recover --out` wrote")
    out = Path(args.out) if args.out else run_dir / "report"
    check_output(out, kind="dir", overwrite=True)  # the report is derived data: rewritten on every call
    figures = FIGURES if is_recovery_folder(run_dir) else ("rates.png", "fitness.png")
    report = build_report(run_dir, out)
    print(f"wrote {report} (with {' and '.join(str(report.parent / name) for name in figures)})")
    return 0
