"""A study's tables, or those of every study under a root, as pyarrow datasets: :func:`open`, the documented way
to read results (``results.open(path).table("epochs")``)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from data.store import ObjectPath, location
from study.results.files import parts, read
from study.results.schema import ALL_TABLES, APPENDED


class Results:
    """The result tables of one study directory, or of every study under a root, as pyarrow datasets.

    ``trials``, ``epochs``, ``events`` and ``evaluations`` (study/evaluate.py; empty until a study is evaluated)
    are :class:`pyarrow.dataset.Dataset` objects with the union of their schemas (studies searching different
    parameters read together; missing columns are null) and a ``study`` column:
    ``r.trials.to_table(filter=pc.field("status") == "completed")``. ``epochs`` and ``events`` of finished
    studies are datasets over the Parquet files (filters are pushed down to the scan); the trials and evaluations
    tables (one row per trial or evaluation, rewritten whole) and a table with parts not yet compacted (a study
    running, or killed) are read whole, as :func:`study.results.files.read` reads them, into in-memory datasets. Each is
    read on first use; :meth:`table` reads one table whole.
    """

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = list(dirs)
        self.files = {name: [d / f"{name}.parquet" for d in self.dirs if (d / f"{name}.parquet").exists()]
                      for name in ALL_TABLES}

    @cached_property
    def trials(self):
        return self._dataset("trials")

    @cached_property
    def epochs(self):
        return self._dataset("epochs")

    @cached_property
    def events(self):
        return self._dataset("events")

    @cached_property
    def evaluations(self):
        return self._dataset("evaluations")

    def _dataset(self, name: str):
        if name in APPENDED and not any(parts(d, name) for d in self.dirs):
            return _dataset(self.files[name])
        tables = [t.replace_schema_metadata(None) for t in self._read(name)]
        return ds.dataset(pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({}))

    def _read(self, name: str) -> list[pa.Table]:
        """Table ``name`` of each study that has written it, whole (files.read)."""
        tables = []
        for d in self.dirs:
            try:
                tables.append(read(d, name))
            except FileNotFoundError:
                continue
        return tables

    def table(self, name: str = "trials", **to_table) -> pa.Table:
        """Table ``name`` whole (its compacted file and parts, deduplicated; of one study with its file metadata),
        or as ``to_table`` (``filter=``, ``columns=``) scans it. FileNotFoundError when no study has written it."""
        if name not in ALL_TABLES:
            raise ValueError(f"unknown table {name!r}; tables: {', '.join(ALL_TABLES)}")
        if to_table:
            return getattr(self, name).to_table(**to_table)
        tables = self._read(name)
        if not tables:
            raise FileNotFoundError(f"{self.dirs[0] if len(self.dirs) == 1 else 'these studies'}: no {name} table yet")
        if len(tables) == 1:
            return tables[0]
        return pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="permissive")

    @property
    def studies(self) -> list[str]:
        return sorted({p.parent.parent.name for p in self.files["trials"]})


def _dataset(files: list[Path | ObjectPath]):
    if not files:
        return ds.dataset(pa.table({}))
    remote = isinstance(files[0], ObjectPath)  # one filesystem: the files of one study, or one root
    fs, names = (files[0].fs, [f.key for f in files]) if remote else (None, [str(f) for f in files])
    schema = pa.unify_schemas([pq.read_schema(n, filesystem=fs).remove_metadata() for n in names],
                              promote_options="permissive")
    return ds.dataset(names, schema=schema, format="parquet", filesystem=fs)


def open(path: str | Path | ObjectPath) -> Results:  # the documented name, study.results.open; shadows the builtin
    """The results under ``path``: a study directory (``<storage>/<name>``) or a root holding several; a path or
    an object-storage URI (``s3://bucket/prefix/name``)."""
    path = location(path)
    here = path / "results"
    dirs = [here] if here.is_dir() else sorted((p / "results" for p in path.iterdir() if (p / "results").is_dir()),
                                               key=str)
    if not dirs:
        raise FileNotFoundError(f"{path}: no results (expected {here}/*.parquet or <study>/results/ below it)")
    return Results(dirs)
