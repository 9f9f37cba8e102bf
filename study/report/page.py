"""``report.html``: the study in one page, a table of the trials and the figures with their captions."""

from __future__ import annotations

import datetime
import html
import math
from collections import Counter
from pathlib import Path

from study.report.data import StudyData
from study.report.grid import scatter_param
from study.report.style import METRIC_LABELS, STATUS_COLORS
from study.status import STATUSES

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1500px; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td.text { text-align: left; }
tr.best { font-weight: bold; background: #eef7ee; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; max-width: 70em; }
.missing { color: #a33; }
.status { padding: 0 0.4em; border-radius: 3px; color: white; }
"""


def _fmt(value) -> str:
    """A table cell as ``ssl-study results`` prints one: floats to 4 significant digits, None as "-"."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _status_badge(status: str) -> str:
    color = STATUS_COLORS.get(status, "#1f77b4")
    text_color = "black" if status == "pending" else "white"
    return f'<span class="status" style="background:{color};color:{text_color}">{html.escape(status)}</span>'


def _sorted_trials(data: StudyData) -> list[dict]:
    """The trials by final metric, best first, those without a finite one last."""
    def key(t: dict):
        v = data.metric_value(t)
        return (not math.isfinite(v), -v if data.maximize and math.isfinite(v) else v if math.isfinite(v) else 0)

    return sorted(data.trials, key=key)


def _summary_table(data: StudyData) -> str:
    names = [p.name for p in data.params]
    metric = data.metric
    trials = _sorted_trials(data)
    best = data.best([t for t in trials if t["status"] == "completed"])
    head = ["trial", "status", *names, "epochs", f"final {metric}", "best knn_top1", "kNN at init", "final loss",
            "verdict", "events", "time (s)", "error"]
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for t in trials:
        verdict = t.get("verdict")
        if verdict:
            verdict = f"{verdict} at epoch {t.get('verdict_epoch')}: {t.get('verdict_reason') or ''}"
        numbers = [*(t.get(n) for n in names), t.get("epochs_done"), t.get(metric), t.get("knn_top1_best"),
                   t.get("knn_top1_init"), t.get("loss")]
        cells = [f'<td class="text">{html.escape(t["trial_id"])}</td>',
                 f'<td class="text">{_status_badge(t["status"])}</td>',
                 *(f"<td>{html.escape(_fmt(v))}</td>" for v in numbers),
                 f'<td class="text">{html.escape(verdict or "-")}</td>',
                 f"<td>{html.escape(_fmt(t.get('events')))}</td>",
                 f"<td>{html.escape(_fmt(t.get('time_total_s')))}</td>",
                 f'<td class="text">{html.escape(t.get("error") or "")}</td>']
        row_class = ' class="best"' if best is not None and t is best else ""
        out.append(f"<tr{row_class}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _evaluations_table(data: StudyData) -> str:
    """``ssl-study evaluate``'s rows, trials in the order of the summary table's best first: empty when none."""
    if not data.evaluations:
        return ""
    rank = {t["trial_id"]: i for i, t in enumerate(_sorted_trials(data))}
    rows = sorted(data.evaluations, key=lambda r: (rank.get(r["trial_id"], len(rank)), r["protocol"], r["k"] or 0))
    head = ["trial", "protocol", "settings", "top-1", "top-5", "time (s)", "evaluated at"]
    out = ["<h2>Evaluations</h2>", "<p>The best trials' exported backbones, frozen, evaluated by <code>ssl-study "
           "evaluate</code>: linear, the paper's linear probe; knn, weighted kNN of the whole test split.</p>",
           "<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = [f'<td class="text">{html.escape(str(r[k]))}</td>' for k in ("trial_id", "protocol", "settings")]
        cells += [f"<td>{html.escape(_fmt(r[k]))}</td>" for k in ("top1", "top5", "seconds")]
        cells.append(f'<td class="text">{html.escape(str(r["evaluated_at"]))}</td>')
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _figure(fid: str, written: dict[str, Path], caption: str, missing: str, attrs: str = "") -> str:
    if fid in written:
        name = html.escape(written[fid].name)
        return (f'<figure id="{fid}"{attrs}><img src="{name}" alt="{html.escape(fid)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return f'<figure id="{fid}"{attrs}><p class="missing">{html.escape(missing)}</p></figure>'


def _heat_section(data: StudyData, written: dict[str, Path], heat: tuple[str, ...], label: str,
                  attrs: str) -> list[str]:
    """The heading and figure of ``heatmap.png``: a scatter over one searched range, else levels in cells."""
    param = scatter_param(data, heat)
    if param is not None:
        scale_text = {"log": "a log axis", "log1m": "1 - m on a log axis"}.get(param.kind, "a linear axis")
        return [f"<h2>Final metric by {html.escape(param.name)}</h2>",
                _figure("heatmap", written, f"Each trial's final {label} at its {param.name}, on {scale_text} as "
                        f"the search space samples it (dotted: the search range), coloured by status; x at the "
                        f"bottom: no finite value.", "No trial to draw.", attrs)]
    return ["<h2>Final metric over two parameters</h2>",
            _figure("heatmap", written, f"Final {label} of the best trial in each cell (as the paper's batch x lr "
                    "table); under the value: the trial's status when it did not complete, its instability verdict "
                    "in parentheses when it completed with one (observe mode); n: trials in the cell.",
                    "The study searched no parameter: no heat map.", attrs)]


def render_html(data: StudyData, written: dict[str, Path], heat: tuple[str, ...], importance_note: str) -> str:
    """The page: ``written`` maps the figure ids to their files (a figure not in it is explained instead),
    ``heat`` names the heat map's axes, ``importance_note`` says how the importances were got or why not."""
    spec = data.spec
    counts = Counter(t["status"] for t in data.trials)
    count_text = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]) or "no trials"
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    best = data.best([t for t in data.trials if t["status"] == "completed"])
    best_text = (f"best completed trial: {best['trial_id']}, {data.metric} = {_fmt(data.metric_value(best))}"
                 if best else "no completed trial with a finite metric")
    searched = ", ".join(f"{p.name} ({p.kind} {list(p.args)})" for p in data.params) or "nothing"
    esc = html.escape
    heat_attrs = "".join(f' data-{axis}="{esc(n)}"' for axis, n in zip(("x", "y"), heat, strict=False))
    label = METRIC_LABELS.get(data.metric, data.metric)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(spec.name)}: ssl-study report</title><style>{CSS}</style></head><body>",
        f"<h1>Study {esc(spec.name)}</h1>",
        f"<p>Generated {esc(now)} from {esc(str(data.study_dir))}.<br>"
        f"Metric: {esc(data.metric)} ({esc(spec.search.mode)}); sampler {esc(spec.search.sampler)}, scheduler "
        f"{esc(spec.scheduler.type)}, instability policy {esc(spec.stopping.mode)}; searched: {esc(searched)}.<br>"
        f"{len(data.trials)} trials: {esc(count_text)}; {esc(best_text)}.</p>",
        "<h2>Trials</h2>",
        f"<p>Sorted by final {esc(data.metric)}, best first; the best completed trial in bold. A verdict is the "
        f"instability policy's (in observe mode it is recorded but the trial goes on).</p>",
        _summary_table(data),
        _evaluations_table(data),
        "<h2>Training curves</h2>",
        _figure("curves", written, "kNN top-1 (epoch 0: at initialisation), training loss and the dense kNN "
                "monitor's minimum within each epoch, one line per trial coloured by status; dashed: stopped by the "
                "instability policy; dash-dot: ran to the end with a policy verdict (observe mode). Markers: "
                "instability events in that epoch, one shape per kind.",
                "No epoch was reported yet."),
        _figure("events", written, "Each instability event at its training step, one row per trial.",
                "No instability event was recorded."),
        _figure("stopped", written, "Each run judged unstable: its epoch kNN top-1 with the band a drop "
                "had to leave, the dense kNN measurements with their binomial band where the run kept its trace, "
                "random init (dotted) and the verdict's epoch (dashed); the reason names the detector and the "
                "noise it was judged against.", "No run was judged unstable."),
        *_heat_section(data, written, heat, label, heat_attrs),
        "<h2>Status counts</h2>",
        _figure("status", written, "Trials by status.", "No trials."),
        "<h2>Parameter importance</h2>",
        _figure("importance", written, importance_note, f"Not computed: {importance_note}."),
        "<h2>Parallel coordinates</h2>",
        _figure("parallel", written, "Each trial is a line across the searched parameters (normalised to the "
                "search range; log parameters on a log axis, choices at evenly spaced positions) and the final "
                "metric, coloured by the metric; red dotted lines end without a finite metric.",
                "The study searched no parameter: no parallel coordinates."),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
