"""A study's results as Parquet tables, written while the study runs.

Under ``<storage>/<name>/results/``, with schema version :data:`SCHEMA_VERSION` in each file's metadata:

- ``trials.parquet``: one row per trial: ``study``, ``trial_id``, every searched parameter as its own typed
  column, ``status`` (study/status.py), epochs done, final / best / at-init kNN top-1, final loss, the
  instability verdict (also in observe mode: ``verdict`` and ``verdict_epoch`` say when the policy would have
  stopped it) and totals of the signals, wall time, resources, checkpoint path, error.
- ``epochs``: one row per trial per reported epoch: every field of ``trainers.records.EpochRecord``.
- ``events``: one row per instability event (trainers/signals.py): step, epoch, kind, layer, magnitude.
- ``evaluations``: one row per evaluation of a trial's exported backbone (``ssl-study evaluate``,
  study/evaluate.py): protocol, settings, top-1 and top-5, one file rewritten whole after each evaluation.

The layout keeps the cost of a reported epoch flat however large the study grows (issue 15 §5):

- ``trials.parquet`` is one file, small (a row per trial), rewritten whole from the rows the writer keeps (as
  columns), at most once per :attr:`ResultsWriter.trials_every_s` while trials report, and at once when a trial
  ends or fails and when the experiment ends.
- ``epochs`` and ``events`` are append-only: ``epochs.parquet`` (the compacted table) plus part files
  ``epochs-part-LO-HI.parquet`` (and the same for ``events``). New rows are buffered and written as one part per
  flush, numbered by a sequence that never goes back (LO == HI for a fresh part). A flush happens once the
  oldest buffered row is :attr:`ResultsWriter.flush_every_s` old or :attr:`ResultsWriter.part_rows` rows are
  buffered, and at once when a result comes with a checkpoint (its rows and all before), when a trial ends or
  fails and when the experiment ends. Every :attr:`ResultsWriter.merge_parts`
  parts of one size class are merged into one part covering their sequence numbers (a part of
  :attr:`ResultsWriter.chunk_rows` rows or more is merged no more), so the files stay few and each row is
  rewritten a bounded number of times. When the experiment ends (and when a
  writer starts on a study that has parts, e.g. after a crash) everything is compacted into ``epochs.parquet`` /
  ``events.parquet`` (file metadata ``ssl_study.through``: the last sequence number folded in) and the parts are
  removed: a finished study has the three files of old.

Every file is written to a temporary name then renamed (``files.write_atomic``, data/atomic.py), or uploaded whole
to object storage (data/store.py), so a reader never sees a partial file. A killed driver loses at most the rows
still buffered, none of them at or before a trial's checkpoint: those are written when the checkpoint's result comes
(a trial restored from its checkpoint goes on with the epoch after it; its re-report of the checkpointed epoch does
not reach Tune on Ray 2.60, seen in tests/test_object_storage.py). A restored trial's reports replace its rows of
that epoch and later (epochs and events), in the writer's buffer, at a merge and at a compaction, and in the reader
(``files.read``), which reads the compacted file and the parts as one table (the later of two reports wins).

Read a study with :func:`open` (also while it runs): ``results.open(study_dir).table("epochs")``, or the
pyarrow datasets ``.trials`` / ``.epochs`` / ``.events`` to filter a scan. ``pq.read_table(".../epochs.parquet")``
or DuckDB's ``read_parquet('.../results/epochs*.parquet')`` read the files as they are: the same table once the
study ended; while it runs, the compacted file only, or parts that may still hold a replaced epoch. A file
replaced while ``pq.read_table(path)`` reads it can read torn (pyarrow opens the path twice): the reader
opens it once. The writer reloads the tables it finds, so a resumed study appends to them.

The files: ``schema.py`` (the tables' schemas, from the typed rows), ``files.py`` (the one reader, the parts and
their merge, the atomic writer), ``writer.py`` (the Tune callback that writes; imports Ray) and ``datasets.py``
(:func:`open`: a study's or a root's tables as pyarrow datasets).
"""

from study.results.datasets import Results, open
from study.results.schema import ALL_TABLES, SCHEMA_VERSION, TABLES

__all__ = ["ALL_TABLES", "SCHEMA_VERSION", "TABLES", "Results", "open"]
