"""``report.html`` in a real browser: headless Chromium (Debian's ``chromium``, which scripts/setup_system.sh
installs) loads the page of two real tiny studies (``conftest.stopping_studies``' grid, with its diverged trials
and events, and ``conftest.lr_range_study``, one log range) and a probe script reports what it decoded: every
figure is an image the browser drew whole, at the PNG's own size, or says why the study has none. A truncated PNG
is caught, so a passing test means the browser really decoded the figures."""

import html
import json
import os
import re
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import pytest

from study import report

BROWSER_TIMEOUT_S = 120  # a load of about 4 s alone; the 2-core machines of these tests are often 20x loaded
# After the load event every image is decoded or has failed. A truncated PNG still has its header's size
# (naturalWidth > 0), but the rows it lacks stay transparent: the probe draws each image on a canvas and records
# its least opaque pixel, 255 for a whole report figure (matplotlib saves them on an opaque white background).
PROBE = """<script>
function minAlpha(img) {
  if (!img.naturalWidth) return 0;
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let least = 255;
  for (let k = 3; k < pixels.length; k += 4) least = Math.min(least, pixels[k]);
  return least;
}
addEventListener("load", () => {
  document.body.dataset.probe = JSON.stringify({
    images: [...document.images].map(i => [i.getAttribute("src"), i.naturalWidth, i.naturalHeight, minAlpha(i)]),
    figures: [...document.querySelectorAll("figure")].map(f =>
      [f.id, f.querySelectorAll("img").length, f.querySelectorAll(".missing").length]),
  });
});
</script>"""


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError("chromium not found; scripts/setup_system.sh installs Debian's chromium")
    return path


def load_in_browser(page: Path, tmp_path: Path) -> dict:
    """What headless Chromium loaded of ``page``: the probe's images and figures. The page is loaded as a copy
    with the probe added and a <base> at ``page``'s folder, so that the report's folder is left as it was."""
    text = page.read_text()
    copy = tmp_path / "probe.html"
    copy.write_text(text.replace("<head>", f'<head><base href="{page.parent.as_uri()}/">', 1)
                    .replace("</body>", PROBE + "</body>", 1))
    # --allow-file-access-from-files: the page may read back the pixels of the images next to it (file:// pages
    # are each their own origin otherwise, and a canvas they draw on is tainted)
    argv = [chromium(), "--headless", "--disable-gpu", "--no-sandbox", "--allow-file-access-from-files",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()]
    browser = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own group: its renderers go with it on a timeout
    try:
        out, err = browser.communicate(timeout=BROWSER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(browser.pid, signal.SIGKILL)
        browser.communicate()
        raise AssertionError(f"chromium did not load {page} within {BROWSER_TIMEOUT_S} s") from None
    found = re.search(r'data-probe="([^"]*)"', out)
    assert found, f"chromium exited {browser.returncode} without the probe's result: {err[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk (bytes 16-24)."""
    return struct.unpack(">II", path.read_bytes()[16:24])


@pytest.fixture(scope="module")
def pages(stopping_studies, lr_range_study, tmp_path_factory) -> dict[str, Path]:
    return {name: report.write_report(spec.study_dir, out=tmp_path_factory.mktemp(name))
            for name, spec in [("grid", stopping_studies["enforce"]), ("lr", lr_range_study)]}


@pytest.mark.parametrize("study", ["grid", "lr"])
def test_every_figure_loads_in_chromium(pages, study, tmp_path):
    page = pages[study]
    probe = load_in_browser(page, tmp_path)
    pngs = {p.name for p in page.parent.glob("*.png")}
    assert {src for src, *_ in probe["images"]} == pngs and len(probe["images"]) == len(pngs)
    for src, width, height, alpha in probe["images"]:  # drawn whole, at the file's own size
        assert (width, height, alpha) == (*png_size(page.parent / src), 255), src
    ids = [fid for fid, *_ in probe["figures"]]
    assert ids == ["curves", "events", "stopped", "heatmap", "status", "importance", "parallel"]
    for fid, images, missing in probe["figures"]:  # an image, or a line saying why there is none
        assert (images, missing) == ((1, 0) if f"{fid}.png" in pngs else (0, 1)), fid
    assert {"curves.png", "heatmap.png", "status.png", "parallel.png"} <= pngs
    if study == "grid":
        assert "events.png" in pngs  # the diverged trials' non-finite events


def test_a_broken_figure_is_caught(pages, tmp_path):
    folder = shutil.copytree(pages["lr"].parent, tmp_path / "report")
    data = (folder / "curves.png").read_bytes()
    (folder / "curves.png").write_bytes(data[: len(data) // 2])  # its header and the first half of its rows
    images = {src: rest for src, *rest in load_in_browser(folder / "report.html", tmp_path)["images"]}
    assert images["curves.png"][2] < 255  # its header's size, but rows the browser could not decode
    assert images["heatmap.png"] == [*png_size(folder / "heatmap.png"), 255]
