"""The error bad dataset input raises (a light module: the CLI imports it before anything heavy)."""

from __future__ import annotations


class DatasetError(ValueError):
    """Bad dataset input (missing source, empty folder, corrupt image, unwritable output...): the message
    names the path and what is accepted, on one line (newlines in file names are shown as \\n), as the
    command line prints it."""

    def __str__(self) -> str:
        return super().__str__().replace("\r", "\\r").replace("\n", "\\n")
