"""
The ``relayer`` command (also ``python -m relayer``).

Sub-commands:

- ``relayer demo``: relayer delivering to three local HTTP targets, one healthy, one flaky and
  one that is down for a while, with live progress and a verified summary.
- ``relayer db upgrade --database URL`` and ``relayer db version --database URL``: create or
  upgrade relayer's tables, or show their schema version.
- ``relayer purge --database URL --keep DURATION``: run the retention policy by hand, now,
  beside the database's running schedulers: purge (or, with ``--archive``, archive) the final
  events that have passed their retention. ``--dry-run`` changes nothing.

- Operator commands, which act on a live system through its database, beside the running
  schedulers (see :mod:`relayer.opscli`):

  - ``relayer status [--target T] [--json]``: each target's state and backlog;
  - ``relayer wake TARGET [--wait SECONDS]``: retry a target now, in whichever process
    delivers to it;
  - ``relayer replay TARGET [--txn N]`` and ``relayer discard TARGET --txn N``: queue dead
    letters again, or give one up;
  - ``relayer dead-letters TARGET``, ``relayer events --target T --state S`` and
    ``relayer event ID``: list dead letters and events, and show where one event stands.

Every command that works on a database takes it from ``--database``, or else from the
environment variable ``RELAYER_DATABASE_URL``, and never prints its password. Exit statuses
are shared: 0 done, 1 the database could not be used or failed, 2 bad usage (or a target, event
or dead letter the database does not know), 3 stopped or timed out before the end, 130
interrupted.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from relayer import dbcli, demo, opscli, purgecli
from relayer._version import __version__


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``relayer`` command and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="relayer",
        description="Reliable, ordered, per-target delivery of events to remote targets.",
    )
    parser.add_argument("--version", action="version", version=f"relayer {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    demo.configure_parser(
        commands.add_parser(
            "demo",
            help="deliver events to three local HTTP targets and verify them",
            description=(
                "Run relayer on a temporary SQLite file against three local HTTP targets: "
                "a healthy one, a flaky one (random HTTP 500) and one that refuses connections "
                "for a while. Shows progress, then verifies that every target received every "
                "event exactly once and in order, and shows where one event sent to all three "
                "with a short time to live stands at each. Exit status: 0 verified, 1 failed, "
                "2 timed out."
            ),
        )
    )
    dbcli.configure_parser(
        commands.add_parser(
            "db",
            help="database maintenance: upgrade the schema, show its version",
            description="Database maintenance for SQLite files and PostgreSQL databases.",
        )
    )
    purgecli.configure_parser(
        commands.add_parser(
            "purge",
            help="purge or archive the final events that have passed their retention, now",
            description=(
                "Run the retention policy by hand, now, as a scheduler with "
                "Scheduler(retention=...) does every interval: purge (or, with --archive, "
                "archive) each event that is final (delivered, expired or discarded) at every "
                "target it was submitted for, and has been for its retention there, with its "
                "transaction and expiry records. Pending events, transactions in flight or "
                "awaiting confirmation, and dead letters stay, however old. Time is measured to "
                "the wall clock now. It runs beside the database's schedulers (it does not take "
                "their process lock), and never creates a database or upgrades its schema."
            ),
            epilog=(
                "Progress goes to stderr, one line a chunk; the report to stdout. "
                "Exit status: 0 done, 1 the database could not be used (no such file, "
                "unreachable, another schema version) or failed, 2 bad usage (an option, a "
                "duration, a target the database does not know) or nothing to do, "
                "3 stopped early because another process's retention run is under way "
                "(PostgreSQL; run again later), 130 interrupted."
            ),
        )
    )
    opscli.configure_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the ``relayer`` command.

    Args:
        argv: The arguments, without the program name; ``sys.argv[1:]`` by default.

    Returns:
        The exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    status: int = args.func(args)
    return status


__all__ = ["build_parser", "main"]
