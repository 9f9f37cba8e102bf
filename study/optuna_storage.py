"""The Optuna study's storage: the one place that turns ``search.storage`` into an Optuna storage object.

``search.storage`` takes:

- nothing (the default): an SQLite file in the study directory, ``<study_dir>/optuna.db``, for a study on a
  local disk. A *new* study whose directory is on a network file system (NFS, CIFS, Lustre, ..., read from
  ``/proc/mounts``) gets ``journal`` instead (:func:`settle_default`), saved so in its ``study.yaml``: SQLite
  relies on ``fcntl()`` locks, which many NFS implementations get wrong, so a second reader or writer (a
  dashboard, ``extend`` from another node) can corrupt the database or see it locked.
- ``journal``: Optuna's journal file in the study directory, ``<study_dir>/optuna.journal``; it moves with the
  study directory like the SQLite default.
- ``journal:///abs/path/optuna.journal``: a journal file anywhere (an absolute path).
- ``sqlite:///path.db``, ``postgresql://user@host:port/db``, ``mysql://...``: an Optuna RDB storage (an
  SQLAlchemy URL). PostgreSQL goes through psycopg2 (``psycopg2-binary`` is a dependency): ``postgresql://`` is
  opened as ``postgresql+psycopg2://``, since SQLAlchemy 2.1 would otherwise ask for psycopg 3. No MySQL driver
  is installed (``pip install pymysql``, then ``mysql+pymysql://``).

Passwords never go in the URL: the resolved study is saved as ``study.yaml`` next to the results, URL and
all, and messages print the URL. A URL holding one (``user:secret@`` or ``?password=``) is refused in one line;
PostgreSQL's driver reads the password from ``PGPASSWORD`` or ``~/.pgpass`` in the environment of the process
that opens the study (MySQL: an option file, ``?read_default_file=~/.my.cnf``).

:func:`check_storage` connects once, so that an unreachable database is one line naming ``search.storage``
(exit code 2) before any Ray or trial resource is spent.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from study.errors import SpecError

if TYPE_CHECKING:
    import optuna


class Study(Protocol):
    """What this module needs of a study (a :class:`study.spec.StudySpec`): its storage URL and its file."""

    optuna_url: str
    source: str

RDB_SCHEMES = ("sqlite:///", "postgresql://", "postgresql+psycopg2://", "mysql://", "mysql+pymysql://")
JOURNAL = "journal"  # search.storage shorthand: the journal file in the study directory
JOURNAL_SCHEME = "journal://"
ACCEPTED = (f"{JOURNAL}, {JOURNAL_SCHEME}/abs/path/optuna.journal, "
            + ", ".join(f"{p}..." for p in RDB_SCHEMES))
PASSWORD_HINT = {"postgresql": "set PGPASSWORD (or a ~/.pgpass entry) in the environment instead",
                 "mysql": "put it in an option file instead, ?read_default_file=~/.my.cnf"}
CONNECT_TIMEOUT_S = 5  # check_storage: an unreachable host is an error after this, not a hang
SQLITE_MAGIC = b"SQLite format 3\x00"


def mask(url: str) -> str:
    """``url`` with its password, if any, shown as ``***`` (in the user part and in a ``password=`` query)."""
    url = re.sub(r"^([\w+.-]+://[^:/@?#]*):[^@]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)


def url_problem(url: str) -> str | None:
    """Why ``url`` is not an accepted ``search.storage`` (one line, password masked), or None; no connection."""
    shown = mask(url)
    if url == JOURNAL:
        return None
    if url.startswith(JOURNAL_SCHEME):
        path = url[len(JOURNAL_SCHEME):]
        if not path.startswith("/") or path.endswith("/"):
            return (f"{shown!r}: a journal file needs an absolute file path, {JOURNAL_SCHEME}/abs/path/optuna.journal "
                    f"(three slashes), or 'journal' for the study directory's; accepted: {ACCEPTED}")
        return None
    if not url.startswith(RDB_SCHEMES):
        return f"{shown!r} is not an Optuna storage URL; accepted: {ACCEPTED}"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return f"{shown!r} is not a database URL (SQLAlchemy cannot parse it); accepted: {ACCEPTED}"
    if parsed.password is not None or any(k.lower() == "password" for k in parsed.query):
        bare = re.sub(r"([?&])password=[^&#]*&?", r"\1", re.sub(r"^([\w+.-]+://[^:/@?#]*):[^@]*@", r"\1@", url),
                      flags=re.IGNORECASE).rstrip("?&")
        return (f"{shown!r} holds a password, which the study's saved study.yaml and its messages would show; "
                f"give {bare!r} and {PASSWORD_HINT.get(parsed.get_backend_name(), PASSWORD_HINT['postgresql'])}")
    return None


def driver_url(url: str) -> str:
    """The SQLAlchemy URL with the project's PostgreSQL driver named: ``postgresql://`` -> ``postgresql+psycopg2://``
    (what to give optuna-dashboard, too)."""
    return "postgresql+psycopg2://" + url[len("postgresql://"):] if url.startswith("postgresql://") else url


def dashboard_argument(url: str) -> str:
    """What to give ``optuna-dashboard`` to open the storage at ``url``: a journal file by its path (the dashboard
    takes an existing file for a journal), a database by its URL with the project's driver (``driver_url``)."""
    return url[len(JOURNAL_SCHEME):] if url.startswith(JOURNAL_SCHEME) else driver_url(url)


def _url_where(target: Study | str) -> tuple[str, str]:
    """The storage URL of ``target`` (a study or a URL) and the key to name in errors."""
    if isinstance(target, str):
        if target == JOURNAL:  # the shorthand means a study directory's file: only a study knows which
            raise SpecError(f"search.storage: {JOURNAL!r} is the journal file of a study directory; give the study, "
                            f"or {JOURNAL_SCHEME}/abs/path/optuna.journal")
        return target, "search.storage"
    return target.optuna_url, f"{target.source}: search.storage"


def file_path(url: str) -> Path | None:
    """The file of a journal or SQLite URL (None for a server, or SQLite in memory)."""
    if url.startswith(JOURNAL_SCHEME):
        return Path(url[len(JOURNAL_SCHEME):])
    if url.startswith("sqlite:"):
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        return Path(database) if database and database != ":memory:" else None
    return None


def _reason(error: BaseException) -> str:
    """The first line of a driver's error, whitespace collapsed, without SQLAlchemy's SQL and link, and with the
    environment's PostgreSQL password (should a driver ever echo it) masked."""
    orig = getattr(error, "orig", None) or error
    text = " ".join((str(orig).strip().splitlines() or [type(orig).__name__])[0].split())
    password = os.environ.get("PGPASSWORD")
    return text.replace(password, "***") if password else text


def _connect_error(where: str, url: str, error: BaseException) -> SpecError:
    reason = _reason(error)
    hint = "check that the server runs and that the host, port, user and database are right"
    if "password" in reason.lower():
        hint = "the password comes from PGPASSWORD or ~/.pgpass in this process's environment"
    return SpecError(f"{where}: {mask(url)!r}: cannot connect ({reason}); {hint}")


def _check_file(where: str, url: str, path: Path, journal: bool) -> None:
    kind = "journal file" if journal else "SQLite database"
    if path.is_dir():
        raise SpecError(f"{where}: {mask(url)!r}: {path} is a directory; give the {kind}'s own file path")
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise SpecError(f"{where}: {mask(url)!r}: {path} is not readable and writable by this user")
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        if journal and head == SQLITE_MAGIC:
            raise SpecError(f"{where}: {mask(url)!r}: {path} is an SQLite database, not a journal; "
                            f"use 'sqlite:///{path}'")
        if not journal and head and head != SQLITE_MAGIC:
            raise SpecError(f"{where}: {mask(url)!r}: {path} is not an SQLite database")
        return
    ancestor = next(p for p in path.absolute().parents if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SpecError(f"{where}: {mask(url)!r}: cannot create {path}: {ancestor} is not a writable directory")


def _check_server(where: str, url: str) -> None:
    import sqlalchemy
    from sqlalchemy.exc import NoSuchModuleError
    from sqlalchemy.pool import NullPool

    try:
        engine = sqlalchemy.create_engine(driver_url(url), poolclass=NullPool,
                                          connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    except (ImportError, NoSuchModuleError) as e:  # the URL's driver is not installed
        fix = ("PostgreSQL's, psycopg2-binary, is among the project's dependencies: reinstall them"
               if url.startswith("postgresql") else "pip install pymysql and use mysql+pymysql://...")
        raise SpecError(f"{where}: {mask(url)!r}: its database driver is not installed ({_reason(e)}); {fix}") from None
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
    except Exception as e:  # refused, unknown host, wrong password, no such database: one line
        raise _connect_error(where, url, e) from None
    finally:
        engine.dispose()


def check_storage(target: Study | str) -> None:
    """Refuse, in one :class:`SpecError` line naming ``search.storage``, a storage that cannot be used: a bad URL,
    a password in it, a database server that cannot be reached or refuses the login, or a file that cannot be
    created. Connects once to a server; creates nothing."""
    url, where = _url_where(target)
    if why := url_problem(url):
        raise SpecError(f"{where}: {why}")
    path = file_path(url)
    if path is not None:
        _check_file(where, url, path, journal=url.startswith(JOURNAL_SCHEME))
    elif not url.startswith("sqlite:"):
        _check_server(where, url)


def open_storage(target: Study | str) -> optuna.storages.BaseStorage:
    """The Optuna storage of a study (its ``search.storage``, or the default) or of a storage URL. Creates the
    file's directory for a journal or SQLite file; a server that cannot be reached is a :class:`SpecError`."""
    url, where = _url_where(target)
    if why := url_problem(url):
        raise SpecError(f"{where}: {why}")
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    path = file_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith(JOURNAL_SCHEME):
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

        # The lock is a file created with O_EXCL next to the journal (and renamed away to release it), which is
        # atomic on NFSv3+; Optuna's default, a symlink lock, is meant for NFSv2. SQLite, by contrast, relies on
        # fcntl() locks, which many NFS implementations get wrong: that is why a study on NFS keeps a journal.
        return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    # A server may drop idle connections during a long trial: check each one before use.
    kwargs = {} if url.startswith("sqlite:") else {"engine_kwargs": {"pool_pre_ping": True}}
    try:
        return optuna.storages.RDBStorage(driver_url(url), **kwargs)
    except (ImportError, SQLAlchemyError) as e:
        raise _connect_error(where, url, e) from None
