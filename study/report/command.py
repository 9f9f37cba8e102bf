"""The ``ssl-study report`` subcommand: its arguments (added to the CLI's parser) and what it runs."""

from __future__ import annotations

from pathlib import Path

from study.report.write import write_report
from study.spec import StudySpec


def add_report_arguments(parser) -> None:
    parser.add_argument("--params", nargs=2, metavar=("X", "Y"), default=None,
                        help="the heat map's two parameters (default: base_lr batch_size when both are searched, "
                             "else the two searched parameters with the most distinct values)")
    parser.add_argument("--out", default=None, help="directory for report.html and the PNGs (default: "
                                                    "<study dir>/report)")


def report_from_args(args, spec: StudySpec) -> int:
    params = tuple(args.params) if getattr(args, "params", None) else None
    out = Path(args.out) if getattr(args, "out", None) else None
    path = write_report(spec.study_dir, params=params, out=out, spec=spec)
    print(path)
    return 0
