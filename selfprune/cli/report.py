"""``selfprune report``: a markdown report with plots for a search run folder."""
from __future__ import annotations

from pathlib import Path

from ..errors import SelfpruneError
from .common import HelpFormatter, check_output


def register(sub, parents=()):
    from ..evaluation import report

    p = sub.add_parser("report", parents=list(parents), formatter_class=HelpFormatter,
                       help="markdown + PNG report of a search run (rates, fitness, tables, settings)",
                       description=report.__doc__)
    p.add_argument("run_dir", help="the run directory written by `selfprune search --out`")
    p.add_argument("--out", default=None, help="folder for report.md and the PNGs; if not given, RUN_DIR/report")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..evaluation.report import build_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise SelfpruneError(f"{run_dir} is not a folder: give the run directory of `selfprune search --out`")
    out = Path(args.out) if args.out else run_dir / "report"
    check_output(out, kind="dir", overwrite=True)  # the report is derived data: rewritten on every call
    report = build_report(run_dir, out)
    print(f"wrote {report} (with {report.parent / 'rates.png'} and {report.parent / 'fitness.png'})")
    return 0
