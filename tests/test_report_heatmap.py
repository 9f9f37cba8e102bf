"""The report's heat-map figure on real tiny studies: one searched range (``conftest.lr_range_study``, the bundled
study's shape: base_lr on a log range) is a scatter on a log axis, each trial at its own value and coloured by its
status; two parameters (``conftest.stopping_studies``' grid) still make a heat map. Read from the figure's
artists, not its pixels."""

import math

import pytest
from matplotlib.colors import to_hex
from studies import LR_RANGE

from study import report
from study.report.heatmap import heatmap_figure
from study.report.style import STATUS_COLORS


def points(ax) -> dict[tuple[float, float], str]:
    """Every scatter point of ``ax`` in data coordinates, with its face colour."""
    out = {}
    for c in ax.collections:
        colors = c.get_facecolors()
        for i, (x, y) in enumerate(c.get_offsets()):
            out[(float(x), float(y))] = to_hex(colors[i if len(colors) > 1 else 0])
    return out


def test_one_log_range_is_a_scatter_on_a_log_axis(lr_range_study):
    spec = lr_range_study
    data = report.load(spec.study_dir, spec)
    assert report.heatmap_params(data) == ("base_lr",) and len(data.trials) == 2
    (ax,) = heatmap_figure(data, ("base_lr",)).axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"
    low, high = ax.get_xlim()
    assert low < LR_RANGE[0] and LR_RANGE[1] < high < 2 * LR_RANGE[1]  # the search range, with a little to spare
    assert not ax.patches and not ax.images  # no bars, no cells: the levels of a range are not categories
    drawn = points(ax)
    finished = [t for t in data.trials if math.isfinite(data.metric_value(t))]
    assert finished, data.trials
    for t in finished:  # each trial at its own base_lr and final kNN (in percent), in its status's colour
        key = next(k for k in drawn if k == pytest.approx((t["base_lr"], 100 * t["knn_top1"])))
        assert drawn[key] == STATUS_COLORS[t["status"]]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert {t["status"] for t in finished} <= set(legend)
    lost = [t for t in data.trials if t not in finished]  # drawn at the bottom, on their own x
    assert len(drawn) == len(finished) + len(lost)


def test_two_parameters_still_make_a_heat_map(stopping_studies):
    spec = stopping_studies["enforce"]
    data = report.load(spec.study_dir, spec)
    (ax, _colorbar) = heatmap_figure(data, report.heatmap_params(data)).axes
    (image,) = ax.images
    assert image.get_array().shape == (2, 2)  # batch_size x base_lr, the paper's table
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.00015", "1e+04"]
