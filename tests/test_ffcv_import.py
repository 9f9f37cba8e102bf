"""data/ffcv_import.py: FFCV's image-mode table is a plain dict (no numba dictionary compiled at import), numba's
typed Dict is left as it was, and a real FFCV file still decodes (in a fresh process: FFCV imports once)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import numpy as np, numba.typed
import data
from data.datasets import convert_arrays
import ffcv.fields.rgb_image as rgb
assert type(rgb.IMAGE_MODES) is dict and rgb.IMAGE_MODES == {"jpg": 0, "raw": 1}, rgb.IMAGE_MODES
assert numba.typed.Dict is not dict
h, w = np.mgrid[:32, :32]  # smooth images, which JPEG keeps close
images = np.stack([np.stack([h * 3 + w * 2 + i * 8 + c * 30 for c in range(3)], -1) for i in range(8)]).astype(np.uint8)
path = convert_arrays(images, np.arange(8) % 2, sys.argv[1], write_mode="jpg", jpeg_quality=95, progress=False)
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.loader import Loader, OrderOption
loader = Loader(str(path), batch_size=8, order=OrderOption.SEQUENTIAL,
                pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
(x, y), = list(loader)
error = np.abs(x.astype(int) - images).mean()
assert x.shape == (8, 32, 32, 3) and error < 4, error
print("ok")
"""


def test_ffcv_imports_with_a_plain_image_mode_table_and_still_decodes(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys\n" + CHECK, str(tmp_path / "d.beton")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr
