"""``ssl-study convert`` on bad input: DatasetError with one line naming the value and what is accepted, raised
before anything is written; through the real command, exit 2 and that one line on stderr, no traceback.

Most cases run in-process (``convert_from_args`` with arguments parsed by ``add_convert_arguments``); starting
the command costs ~8 s on 2 cores, so only four go through it, started together.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data.convert import read_metadata
from data.datasets import DatasetError, add_convert_arguments, check, convert_from_args

SSL_STUDY = Path(sys.executable).with_name("ssl-study")


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def _photos(root: Path, counts: dict[str, int], size: int = 24) -> Path:
    """A flat folder root/<class>/ of ``counts[class]`` small PNGs, each another colour."""
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for k in range(n):
            Image.new("RGB", (size, size), (40 * k % 256, 100, len(c) * 30 % 256)).save(root / c / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def flat(tmp_path_factory) -> Path:
    return _photos(tmp_path_factory.mktemp("flat") / "photos", {"cat": 6, "dog": 6})


def _error(args: argparse.Namespace) -> str:
    """The message of the DatasetError that ``args`` raise, checked to be one line with nothing written."""
    with pytest.raises(DatasetError) as err:
        convert_from_args(args)
    message = str(err.value)
    assert "\n" not in message and message
    out = Path(args.out_dir)
    assert not out.is_dir() or not [p for p in out.iterdir()], f"{out} written to: {list(out.iterdir())}"
    return message


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--workers", "0", "workers must be >= 1, got 0"),
    ("--jpeg-quality", "0", "jpeg_quality must be in [1, 100], got 0"),
    ("--jpeg-quality", "101", "jpeg_quality must be in [1, 100], got 101"),
    ("--max-resolution", "-1", "positive number of pixels, or 0 (or None) for no cap; got -1"),
    ("--smart-threshold", "-5", "smart_threshold must be >= 0 bytes (0: every image JPEG), got -5"),
    ("--val-fraction", "-0.1", "val_fraction must be a share in [0, 1]"),
    ("--val-fraction", "1.5", "val_fraction must be a share in [0, 1]"),
    ("--val-fraction", "nan", "got nan"),
])
def test_bad_options_name_the_value_and_the_accepted_range(flat, tmp_path, option, value, expected):
    assert expected in _error(_parse(flat, tmp_path / "out", option, value))


@pytest.mark.parametrize("fraction", ["0", "1"])
def test_a_flat_folder_needs_a_val_fraction_strictly_between_0_and_1(flat, tmp_path, fraction):
    message = _error(_parse(flat, tmp_path / "out", "--val-fraction", fraction))
    assert str(flat) in message and f"must be in (0, 1); got {float(fraction)}" in message


# ---------------------------------------------------------------------------------------------- sources


def test_missing_empty_and_misspelt_sources(tmp_path):
    for source in (tmp_path / "nowhere", ""):
        message = _error(_parse(source, tmp_path / "out"))
        assert f"source {str(source)!r} not found" in message and "fashion_mnist, mnist, or the path" in message
    with pytest.raises(DatasetError, match="did you mean 'fashion_mnist'"):
        check("Fashion-MNIST", tmp_path / "d")


@pytest.mark.parametrize("name", ["imagenet.tar", "photos.zip"])
def test_an_archive_is_a_file_to_extract_first(tmp_path, name):
    archive = tmp_path / name
    archive.write_bytes(b"PK\x03\x04 not really")
    message = _error(_parse(archive, tmp_path / "out"))
    assert str(archive) in message and "is a file, not a folder" in message and "must be extracted" in message


def test_folders_without_classes_or_images(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "a.png")
    assert "has no class sub-folders" in _error(_parse(loose, tmp_path / "out"))
    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "cat" / "notes.txt").write_text("x")
    message = _error(_parse(no_images, tmp_path / "out"))
    assert "['cat'] hold no image files" in message and ".jpg" in message


def test_every_image_corrupt_stops_before_writing(tmp_path):
    root = tmp_path / "broken"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for k in range(3):
            (root / c / f"{k}.jpg").write_bytes(b"\xff\xd8 this is no JPEG")
    message = _error(_parse(root, tmp_path / "out", "--val-fraction", "0.5"))
    assert message.startswith(f"corrupt or unreadable image {root / 'cat'}") and "--skip-corrupt" in message
    message = _error(_parse(root, tmp_path / "out", "--val-fraction", "0.5", "--skip-corrupt"))
    assert "no readable image in split 'train'" in message


def test_an_image_too_thin_to_cap_is_named(tmp_path):
    root = _photos(tmp_path / "thin", {"cat": 6, "dog": 6})
    thin = root / "dog" / "line.png"
    Image.new("RGB", (600, 1)).save(thin)  # 1 px * 256 / 600 is 0 px: cv2 would fail on it
    message = _error(_parse(root, tmp_path / "out"))
    assert f"corrupt or unreadable image {thin} (its short side would be 0 px at max_resolution 256)" in message


# ---------------------------------------------------------------------------------------------- output folder


def test_output_folder_that_is_a_file_or_inside_the_source(flat, tmp_path):
    blocker = tmp_path / "out.beton"
    blocker.write_text("x")
    assert f"output folder {blocker} is an existing file, not a folder" in _error(_parse(flat, blocker))
    inside = flat / "converted"
    assert "is inside the image folder it converts" in _error(_parse(flat, inside))
    assert not inside.exists()  # else the next scan would take it for a class


def test_unwritable_output_folder(flat, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0o500 folder")
        assert f"output folder {locked / 'out'} is not writable" in _error(_parse(flat, locked / "out"))
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------------------------------------- awkward folders


def test_a_one_image_class_split_by_val_fraction_stays_in_train(tmp_path):
    root = _photos(tmp_path / "small", {"one": 1, "three": 3})
    assert convert_from_args(_parse(root, tmp_path / "out", "--val-fraction", "0.5", "--no-progress")) == 0
    train, val = (read_metadata(tmp_path / "out" / f"small_{s}.beton") for s in ("train", "val"))
    assert (train["count"], val["count"]) == (2, 2)  # one: 1 train; three: round(1.5) = 2 val, 1 train
    only_ones = _photos(tmp_path / "ones", {"a": 1, "b": 1})
    assert "too few for a train/val split" in _error(_parse(only_ones, tmp_path / "out2", "--val-fraction", "0.5"))


def test_odd_file_names_work_and_odd_files_are_counted(tmp_path):
    root = _photos(tmp_path / "odd", {"cat": 2, "dog": 2})
    Image.new("RGB", (24, 24), (9, 9, 9)).save(root / "cat" / os.fsdecode(b"caf\xe9 latin-1.png"), format="PNG")
    Image.new("RGB", (24, 24), (7, 7, 7)).save(root / "dog" / "line\nbreak ünï.png")
    (root / "dog" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # a broken link
    os.mkfifo(root / "dog" / "pipe.png")  # PIL would wait on it forever
    out = tmp_path / "out"
    assert convert_from_args(_parse(root, out, "--no-progress", "--val-fraction", "0.3")) == 0
    train, val = (read_metadata(out / f"odd_{s}.beton") for s in ("train", "val"))
    assert train["count"] + val["count"] == 6 and train["ignored_files"] == 2
    # a corrupt image whose name holds a newline: the message stays one line
    (root / "dog" / "bad\nname.png").write_bytes(b"not a png")
    message = _error(_parse(root, tmp_path / "out3", "--val-fraction", "0.3"))
    assert "bad\\nname.png" in message


# ---------------------------------------------------------------------------------------------- the command


CLI_CASES = {
    "missing source": (["{tmp}/nowhere", "{tmp}/out"], "source '{tmp}/nowhere' not found"),
    "archive": (["{tmp}/photos.tar", "{tmp}/out"], "{tmp}/photos.tar is a file, not a folder"),
    "output is a file": (["{flat}", "{tmp}/photos.tar"], "output folder {tmp}/photos.tar is an existing file"),
    "jpeg quality": (["{flat}", "{tmp}/out", "--jpeg-quality", "101"], "jpeg_quality must be in [1, 100], got 101"),
}


@pytest.fixture(scope="module")
def cli_runs(flat, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """Each CLI case run through the real command, all started at once (each start takes seconds)."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "photos.tar").write_bytes(b"ustar, not extracted")
    running = {}
    for case, (argv, expected) in CLI_CASES.items():
        cmd = [str(SSL_STUDY), "convert", *(a.format(tmp=tmp, flat=flat) for a in argv)]
        running[case] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                         expected.format(tmp=tmp, flat=flat))
    results = {}
    for case, (proc, expected) in running.items():
        out, err = proc.communicate(timeout=600)  # minutes when other work shares the 2 cores
        results[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), expected)
    assert not (tmp / "out").exists()
    return results


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_the_command_prints_one_line_and_exits_2(cli_runs, case):
    run, expected = cli_runs[case]
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("ssl-study: error: "), run.stderr
    assert expected in run.stderr
