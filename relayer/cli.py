"""
The ``relayer`` command (also ``python -m relayer``).

Sub-commands:

- ``relayer demo``: relayer delivering to three local HTTP targets, one healthy, one flaky and
  one that is down for a while, with live progress and a verified summary.
- ``relayer db upgrade --database URL`` and ``relayer db version --database URL``: create or
  upgrade relayer's tables, or show their schema version.

Operator commands (status, wake, dead letters, replay) will join it as sub-commands.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from relayer import dbcli, demo
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
