"""``ssl-study report`` on a real tiny study (``conftest.stopping_studies``' ``enforce``): a 2 x 2 grid of
base_lr x batch_size on a real local Ray with real Fashion-MNIST FFCV files, one learning rate so large that its
trials diverge (non-finite events, status diverged)."""

import argparse
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from studies import DIVERGING

from study import report
from study.spec import SpecError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished(stopping_studies):
    spec = stopping_studies["enforce"]
    return spec, pq.read_table(spec.study_dir / "results" / "trials.parquet").to_pylist()


@pytest.fixture(scope="module")
def rendered(finished):
    spec, trials = finished
    return spec, trials, report.write_report(spec.study_dir)


def _png_ok(path: Path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 5_000


def test_html_names_every_trial_and_status(rendered):
    spec, trials, page = rendered
    assert page == spec.study_dir / "report" / "report.html" and page.is_file()
    text = page.read_text()
    assert len(trials) == 4
    assert spec.name in text and "Generated" in text
    for t in trials:
        assert t["trial_id"] in text and t["status"] in text
    # the huge learning rate diverged and the policy stopped it; the report shows that status
    assert any(t["status"] == "diverged" for t in trials if t["base_lr"] == DIVERGING), trials
    assert "diverged" in text
    assert not list(page.parent.glob(".*.tmp"))  # every file went through a temporary name and a rename


def test_figures_are_real_pngs(rendered):
    _, _, page = rendered
    text = page.read_text()
    for name in ("curves", "events", "heatmap", "status", "parallel"):
        png = page.parent / f"{name}.png"
        assert _png_ok(png), name
        assert f'src="{name}.png"' in text


def test_heatmap_axes_are_the_searched_params(rendered):
    spec, _, page = rendered
    assert report.heatmap_params(report.load(spec.study_dir, spec)) == ("base_lr", "batch_size")
    assert re.search(r'<figure id="heatmap" data-x="base_lr" data-y="batch_size">', page.read_text())


def test_importance_is_drawn_or_explained(rendered):
    _, _, page = rendered
    text = page.read_text()
    section = text[text.index('<figure id="importance"'):]
    section = section[:section.index("</figure>")]
    if (page.parent / "importance.png").exists():
        assert _png_ok(page.parent / "importance.png") and 'src="importance.png"' in section
        assert "PED-ANOVA" in section
    else:
        assert "Not computed" in section and "COMPLETE" in section


def test_cli_arguments_swap_the_axes_and_choose_the_directory(finished, tmp_path, capsys):
    spec, _ = finished
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    report.add_report_arguments(parser)
    args = parser.parse_args([spec.name, "--params", "batch_size", "base_lr", "--out", str(tmp_path / "out")])
    assert report.report_from_args(args, spec) == 0
    page = tmp_path / "out" / "report.html"
    assert capsys.readouterr().out.strip() == str(page)
    assert '<figure id="heatmap" data-x="batch_size" data-y="base_lr">' in page.read_text()
    assert _png_ok(tmp_path / "out" / "heatmap.png")

    args = parser.parse_args([spec.name, "--params", "base_lr", "nope", "--out", str(tmp_path / "bad")])
    with pytest.raises(SpecError, match="nope"):
        report.report_from_args(args, spec)
