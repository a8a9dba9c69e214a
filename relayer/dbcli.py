"""
``relayer db``: database maintenance from the command line.

- ``relayer db upgrade --database URL``: create relayer's tables, or bring them up to this
  version's schema, in place and without loss. ``URL`` is ``sqlite:///path/to/file`` (or a plain
  file path) or ``postgresql://user:password@host:port/database``.
- ``relayer db version --database URL``: show the schema version of a database.

The URL may also come from the environment variable ``RELAYER_DATABASE_URL``, which keeps a
PostgreSQL password out of the process list (where any user can read a command line);
``--database`` wins when both are given. The password is never printed.

Schedulers upgrade the schema themselves when they start; the command lets an operator do it
ahead of a deployment, for example before starting several processes at once.

The module also holds what every command that works on a database shares: the ``--database``
option with its environment variable, engines, URLs shown without their password, the checks
made before a command uses a database that schedulers use (:func:`inspect`,
:func:`problem_of`), and stores opened for a command that blocks (:func:`open_store`).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast
from urllib.parse import quote

import attrs
import sqlalchemy as sa
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from relayer.errors import RelayerError
from relayer.store import schema
from relayer.store.sql import SQLStore

T = TypeVar("T")

#: The environment variable that gives the database URL when ``--database`` is not given.
DATABASE_ENV = "RELAYER_DATABASE_URL"


def is_postgres(database: str) -> bool:
    """Whether ``database`` is a PostgreSQL URL (else a SQLite URL or file path)."""
    return database.startswith(("postgresql://", "postgresql+psycopg://"))


def sqlite_path(database: str) -> str:
    """
    The file of a ``sqlite:///`` URL or a plain path.

    Raises:
        RelayerError: ``database`` is a URL of another kind.
    """
    path = database[len("sqlite:///") :] if database.startswith("sqlite:///") else database
    if "://" in path:
        raise RelayerError(f"unsupported database URL: {safe_url(database)}")
    return path


def engine_for(database: str, create: bool = True) -> sa.Engine:
    """
    An engine for a ``sqlite:///`` or ``postgresql://`` URL, or a SQLite file path.

    Args:
        database: The URL or path.
        create: Whether a SQLite file that does not exist may be created.
    """
    if is_postgres(database):
        from relayer.store.postgres import postgres_engine

        return postgres_engine(database, pool_size=1)
    from relayer.store.sqlite import sqlite_engine

    path = sqlite_path(database)
    if not create and not os.path.exists(path):
        raise RelayerError("no such file")
    return sqlite_engine(path)


class BlockingPool:
    """
    A database pool that runs each unit of work at once, on the calling thread.

    A command blocks while the database works, and runs no reactor: with this pool a store's
    Deferreds have fired by the time its methods return (see :func:`wait`).
    """

    def start(self) -> None:
        """Nothing to start."""

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """Run ``f(*args, **kwargs)`` now; an interrupt (Ctrl-C) is raised as it is."""
        try:
            result = f(*args, **kwargs)
        except Exception:
            return fail()
        return succeed(result)

    def stop(self) -> Deferred[None]:
        """Nothing to stop."""
        return succeed(None)


def wait(d: Deferred[T]) -> T:
    """The result of a Deferred of a store on a :class:`BlockingPool`; raises its failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("the database work did not finish at once")
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return cast(T, results[0])


def open_store(database: str) -> SQLStore:
    """
    Open a store on ``database`` (as :func:`engine_for` takes it) for a command: on a
    :class:`BlockingPool`, and without the process lock that a scheduler takes, so that the
    command can run beside the database's schedulers.

    It does not call the store's ``open()``, which would upgrade an older schema: the caller
    checks the version first.
    """
    # The store delivers no results through the reactor on a blocking pool; the PostgreSQL
    # store keeps it for listen(), which a command never calls.
    from twisted.internet import reactor

    where = cast(IReactorFromThreads, reactor)
    if is_postgres(database):
        from relayer.store.postgres import PostgresStore

        return PostgresStore.open_url(where, database, pool=BlockingPool(), pool_size=1)
    from relayer.store.sqlite import SQLiteStore

    return SQLiteStore.open_path(where, sqlite_path(database), pool=BlockingPool())


def add_database_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--database`` to a command's parser."""
    parser.add_argument(
        "--database",
        default=None,
        metavar="URL",
        help=(
            "sqlite:///path/to/file, a SQLite file path, or postgresql://user@host/db; "
            f"by default ${DATABASE_ENV}, which keeps a password off the command line"
        ),
    )


def database_of(args: argparse.Namespace, command: str) -> str | None:
    """
    The database a command was given: ``--database``, else ``$RELAYER_DATABASE_URL``. None,
    after saying on stderr how to give one, if there is neither.
    """
    database: str | None = (
        args.database if args.database is not None else os.environ.get(DATABASE_ENV)
    )
    if not database:
        print(
            f"{command}: no database given: pass --database URL, or set "
            f"{DATABASE_ENV} (which keeps a password out of the process list)",
            file=sys.stderr,
        )
        return None
    return database


def error_message(e: sa.exc.SQLAlchemyError) -> str:
    """The first line of the driver's message for a database error (no SQL, no password)."""
    orig = getattr(e, "orig", None)
    return str(orig if orig is not None else e).strip().splitlines()[0]


def safe_url(database: str) -> str:
    """The URL without its password."""
    if "://" not in database:
        return database
    try:
        return sa.make_url(database).render_as_string(hide_password=True)
    except Exception:
        return "<database URL>"


def read_only_engine(database: str) -> sa.Engine:
    """An engine that only reads: a SQLite file is opened read-only, so never created."""
    if is_postgres(database):
        return engine_for(database)
    uri = f"file:{quote(os.path.abspath(sqlite_path(database)))}?mode=ro"
    return sa.create_engine(
        "sqlite://",
        creator=lambda: sqlite3.connect(uri, uri=True, timeout=10.0),
        poolclass=sa.pool.NullPool,
    )


#: How many target ids a message lists, at most.
SOME_TARGETS = 10


@attrs.frozen
class Inspection:
    """
    What a command reads of a database before it opens a store on it.

    Attributes:
        version: The schema version (0 for a database without relayer's tables).
        known: Of the targets asked about, those the database knows.
        some_targets: The first target ids (at most :data:`SOME_TARGETS`), for messages.
        n_targets: How many targets the database knows.
        longest_target_id: The length of its longest target id (0 without targets).
        before: For each known target asked about, the id that comes just before it in the
            database's order (None for the first), to read a page of targets that starts
            with it.
    """

    version: int
    known: frozenset[str] = frozenset()
    some_targets: tuple[str, ...] = ()
    n_targets: int = 0
    longest_target_id: int = 0
    before: Mapping[str, str | None] = attrs.field(factory=dict)

    def targets_text(self) -> str:
        """The database's targets, for a message: ``a, b, c and 12 more``, or ``none``."""
        if not self.n_targets:
            return "none"
        more = self.n_targets - len(self.some_targets)
        return ", ".join(self.some_targets) + (f" and {more} more" if more > 0 else "")


def inspect(database: str, target_ids: Iterable[str] = ()) -> Inspection:
    """
    Read the schema version of ``database`` and which of ``target_ids`` it knows; change
    nothing. A SQLite file is opened read-only (see :func:`problem_of` for a missing one).

    Raises:
        sqlalchemy.exc.SQLAlchemyError: The database cannot be read.
        RelayerError: ``database`` is a URL of a kind relayer does not support.
    """
    asked = sorted(set(target_ids))
    engine = read_only_engine(database)
    try:
        with engine.connect() as conn:
            version = schema.read_version(conn)
            if version != schema.SCHEMA_VERSION:
                return Inspection(version)
            t = schema.targets.c
            known: set[str] = set()
            for i in range(0, len(asked), 500):
                known.update(
                    conn.execute(
                        sa.select(t.target_id).where(t.target_id.in_(asked[i : i + 500]))
                    ).scalars()
                )
            some = tuple(
                conn.execute(
                    sa.select(t.target_id).order_by(t.target_id).limit(SOME_TARGETS)
                ).scalars()
            )
            n, longest = conn.execute(
                sa.select(sa.func.count(), sa.func.max(sa.func.length(t.target_id)))
            ).one()
            # In the database's own order (its collation), as a page of targets reads them.
            before = {
                target_id: conn.execute(
                    sa.select(sa.func.max(t.target_id)).where(t.target_id < target_id)
                ).scalar()
                for target_id in sorted(known)[:SOME_TARGETS]
            }
            return Inspection(version, frozenset(known), some, int(n), int(longest or 0), before)
    finally:
        engine.dispose()


def schema_problem(version: int, command: str) -> str | None:
    """
    Why ``relayer COMMAND`` cannot use a database of this schema version, or None if it can:
    a command beside running schedulers neither creates relayer's tables nor upgrades them.
    """
    if version == schema.SCHEMA_VERSION:
        return None
    if version == 0:
        return (
            "holds no relayer tables (schema version 0): is it the database that the "
            "schedulers use?"
        )
    if version < schema.SCHEMA_VERSION:
        return (
            f"has relayer schema version {version}, older than this relayer's "
            f"{schema.SCHEMA_VERSION}: run `relayer db upgrade` first ({command} never upgrades; "
            "nothing was changed)"
        )
    return (
        f"has relayer schema version {version}, but this relayer only knows versions up to "
        f"{schema.SCHEMA_VERSION}: use a newer relayer (nothing was changed)"
    )


def problem_of(
    database: str, command: str, target_ids: Iterable[str] = ()
) -> tuple[str | None, Inspection | None]:
    """
    Check a database before ``relayer COMMAND`` uses it: a SQLite file must exist, and the
    schema must be this relayer's.

    Returns:
        ``(problem, None)``, the problem a one-line message says (without the database's URL),
        or ``(None, inspection)``.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: The database cannot be read.
        RelayerError: ``database`` is a URL of a kind relayer does not support.
    """
    if not is_postgres(database) and not os.path.isfile(sqlite_path(database)):
        return f"no such file ({command} never creates a database)", None
    found = inspect(database, target_ids)
    problem = schema_problem(found.version, command)
    if problem is not None:
        return problem, None
    return None, found


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``db`` sub-commands to ``parser``."""
    commands = parser.add_subparsers(title="commands", dest="db_command", metavar="COMMAND")
    for name, help_text in (
        ("upgrade", "create or upgrade relayer's tables to this version's schema"),
        ("version", "show the schema version of a database"),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_database_option(sub)
        sub.set_defaults(func=run)

    def usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)


def run(args: argparse.Namespace) -> int:
    """Run a ``relayer db`` command; return the exit status."""
    database = database_of(args, f"relayer db {args.db_command}")
    if database is None:
        return 2
    where = safe_url(database)
    try:
        engine = engine_for(database, create=args.db_command == "upgrade")
        try:
            with engine.begin() as conn:
                if args.db_command == "version":
                    found = schema.read_version(conn)
                    print(
                        f"{where}: schema version {found} (this relayer: {schema.SCHEMA_VERSION})"
                    )
                    return 0
                before, after = schema.upgrade(conn)
        finally:
            engine.dispose()
    except sa.exc.SQLAlchemyError as e:
        print(
            f"relayer db {args.db_command}: cannot use {where}: {error_message(e)}",
            file=sys.stderr,
        )
        return 1
    except RelayerError as e:
        print(f"relayer db {args.db_command}: {where}: {e}", file=sys.stderr)
        return 1
    if before == after:
        print(f"{where}: schema version {after}, up to date")
    else:
        print(f"{where}: upgraded the schema from version {before} to {after}")
    return 0
