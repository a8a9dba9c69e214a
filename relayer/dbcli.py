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
"""

from __future__ import annotations

import argparse
import os
import sys

import sqlalchemy as sa

from relayer.errors import RelayerError
from relayer.store import schema

#: The environment variable that gives the database URL when ``--database`` is not given.
DATABASE_ENV = "RELAYER_DATABASE_URL"


def engine_for(database: str, create: bool = True) -> sa.Engine:
    """
    An engine for a ``sqlite:///`` or ``postgresql://`` URL, or a SQLite file path.

    Args:
        database: The URL or path.
        create: Whether a SQLite file that does not exist may be created.
    """
    if database.startswith(("postgresql://", "postgresql+psycopg://")):
        from relayer.store.postgres import postgres_engine

        return postgres_engine(database, pool_size=1)
    from relayer.store.sqlite import sqlite_engine

    path = database[len("sqlite:///") :] if database.startswith("sqlite:///") else database
    if "://" in path:
        raise RelayerError(f"unsupported database URL: {safe_url(database)}")
    if not create and not os.path.exists(path):
        raise RelayerError("no such file")
    return sqlite_engine(path)


def safe_url(database: str) -> str:
    """The URL without its password."""
    if "://" not in database:
        return database
    try:
        return sa.make_url(database).render_as_string(hide_password=True)
    except Exception:
        return "<database URL>"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``db`` sub-commands to ``parser``."""
    commands = parser.add_subparsers(title="commands", dest="db_command", metavar="COMMAND")
    for name, help_text in (
        ("upgrade", "create or upgrade relayer's tables to this version's schema"),
        ("version", "show the schema version of a database"),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--database",
            default=None,
            metavar="URL",
            help=(
                "sqlite:///path/to/file, a SQLite file path, or postgresql://user@host/db; "
                f"by default ${DATABASE_ENV}, which keeps a password off the command line"
            ),
        )
        sub.set_defaults(func=run)

    def usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)


def run(args: argparse.Namespace) -> int:
    """Run a ``relayer db`` command; return the exit status."""
    database = args.database if args.database is not None else os.environ.get(DATABASE_ENV)
    if not database:
        print(
            f"relayer db {args.db_command}: no database given: pass --database URL, or set "
            f"{DATABASE_ENV} (which keeps a password out of the process list)",
            file=sys.stderr,
        )
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
        orig = getattr(e, "orig", None)
        message = str(orig if orig is not None else e).strip().splitlines()[0]
        print(f"relayer db {args.db_command}: cannot use {where}: {message}", file=sys.stderr)
        return 1
    except RelayerError as e:
        print(f"relayer db {args.db_command}: {where}: {e}", file=sys.stderr)
        return 1
    if before == after:
        print(f"{where}: schema version {after}, up to date")
    else:
        print(f"{where}: upgraded the schema from version {before} to {after}")
    return 0
