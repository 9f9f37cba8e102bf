"""``write_report``: every figure and the page of one study, into one directory."""

from __future__ import annotations

import tempfile
from pathlib import Path

from data.atomic import write_text
from data.store import ObjectPath, location
from study.report.data import load
from study.report.grid import heatmap_params
from study.report.page import render_html
from study.spec import SpecError, StudySpec, load_spec


def _output_dir(out: Path) -> Path:
    """``out``, created if missing; a SpecError when it is not a directory this process can write in."""
    if out.exists() and not out.is_dir():
        raise SpecError(f"{out}: not a directory; --out takes a directory (created when missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # unwritable: say so now, not after the first figure
    except OSError as e:
        raise SpecError(f"{out}: cannot write the report there ({e.strerror}); --out takes a writable "
                        f"directory") from None
    return out


def write_report(study_dir: Path | ObjectPath, *, params: tuple[str, str] | None = None, out: Path | None = None,
                 spec: StudySpec | None = None) -> Path:
    """Write the figures and ``report.html`` of the study in ``study_dir``; return the HTML path.

    ``spec`` defaults to the resolved study saved in ``study_dir`` (``study.yaml``); ``params`` names the heat
    map's axes (x, y); ``out`` defaults to ``<study_dir>/report``. Bad input (no results, an unreadable table,
    an unknown parameter, an unwritable ``out``) is a SpecError before anything is written. A study in object
    storage is read from there; its report is written on this machine (``spec.local_dir/report`` by default) and
    uploaded to ``<study_dir>/report``.
    """
    study_dir = location(study_dir)
    if spec is None:
        spec = load_spec(study_dir / "study.yaml")
    data = load(study_dir, spec)
    heat = heatmap_params(data, params)
    remote = isinstance(study_dir, ObjectPath)
    out = _output_dir(Path(out) if out is not None else (spec.local_dir if remote else study_dir) / "report")
    # The figure modules import matplotlib: only now that the input is known good, and not when the package is
    # imported (the CLI imports it to build its parser: `ssl-study --help` stays fast).
    from study.report.curves import plot_curves
    from study.report.events import plot_events
    from study.report.heatmap import plot_heatmap
    from study.report.importance import param_importance, plot_importance
    from study.report.parallel import plot_parallel
    from study.report.status_counts import plot_status
    from study.report.stopped import plot_stopped

    scores, note = param_importance(spec, study_dir)
    drawn = {"curves": plot_curves(data, out / "curves.png"),
             "events": plot_events(data, out / "events.png"),
             "stopped": plot_stopped(data, out / "stopped.png"),
             "heatmap": plot_heatmap(data, heat, out / "heatmap.png"),
             "status": plot_status(data, out / "status.png"),
             "importance": plot_importance(data, scores, note, out / "importance.png") if scores else None,
             "parallel": plot_parallel(data, out / "parallel.png")}
    for fid, path in drawn.items():
        if path is None:  # a figure of an earlier report that this one could not draw must not linger
            (out / f"{fid}.png").unlink(missing_ok=True)
    written = {fid: path for fid, path in drawn.items() if path is not None}
    page = write_text(out / "report.html", render_html(data, written, heat, note))
    if remote:
        for path in [*written.values(), page]:
            (study_dir / "report" / Path(path).name).upload(Path(path))
    return page
