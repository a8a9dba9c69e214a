"""
``relayer purge``: run the retention policy by hand, now, against a live database.

It purges (or, with ``--archive``, archives) the final events that have passed their
retention, as a scheduler made with ``Scheduler(retention=Retention(...))`` does every
``interval``, with the same rules (:class:`relayer.Retention`) and the same code
(:meth:`relayer.store.SQLStore.purge`): an event goes once it is delivered, expired or
discarded at every target it was submitted for, and each target's retention has passed since.
Pending events, transactions in flight or awaiting confirmation, and dead letters stay.

The retention is given on the command line: ``--keep`` for every target, and ``--target-keep
TARGET=DURATION`` for the targets that keep theirs longer or shorter (a scheduler's
:attr:`relayer.TargetConfig.retention`, which the command cannot know). Time is measured to
the wall clock now (``time.time()``), which is the clock of a scheduler on a real reactor.

The command runs beside the database's schedulers: it does not take their process lock. On
SQLite each chunk is a write transaction that waits for the scheduler's (the busy timeout);
on PostgreSQL a chunk takes the advisory lock that lets one retention run go at a time in the
schema, and the command stops, saying so, if another run holds that lock when a chunk begins. It
never creates a database and never upgrades a schema: a database of another schema version is
refused.

It also refuses a ``--target-keep`` of a target that the database does not know (a typo would
leave that target to ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

import attrs
import sqlalchemy as sa

from relayer import dbcli
from relayer.config import MAX_RETENTION, Retention
from relayer.errors import ConfigurationError, RelayerError, SchemaVersionError
from relayer.store import PurgeReport, RetentionRule

#: The exit statuses.
EXIT_OK = 0
#: The database could not be used (missing, unreachable, another schema version), or failed.
EXIT_FAILED = 1
#: The command line is not valid, asks for nothing, or names a target the database does not
#: know.
EXIT_USAGE = 2
#: The run stopped before the end: on PostgreSQL, another process's retention run was under way.
EXIT_STOPPED = 3
#: Interrupted (Ctrl-C); the chunks done before are kept.
EXIT_INTERRUPTED = 130

#: A duration's units, in seconds.
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([smhdw])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?|\.\d+")
#: What --keep and --target-keep take to keep final events for ever.
FOREVER = "forever"

_COMMAND = "relayer purge"


def parse_duration(text: str) -> float | None:
    """
    Seconds from ``3600``, ``90m``, ``12h``, ``30d``, ``1w`` or ``1d12h``; None for ``forever``.

    Raises:
        ValueError: ``text`` is none of these, or not more than 0 and at most 100 years.
    """
    value = text.strip().lower()
    if value == FOREVER:
        return None
    if _NUMBER.fullmatch(value):
        seconds = float(value)
    else:
        parts = _PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise ValueError(
                f"{text!r} is not a duration: give seconds (3600) or a number with a unit "
                "(45s, 90m, 12h, 30d, 1w, 1d12h), or 'forever'"
            )
        seconds = sum(float(n) * UNITS[u] for n, u in parts)
    try:
        # One check of a retention, the scheduler's own.
        Retention(keep=seconds)
    except ConfigurationError:
        raise ValueError(
            f"{text!r} is not a retention: it must be more than 0 and at most "
            f"{MAX_RETENTION / 86400:g}d"
        ) from None
    return seconds


def format_duration(seconds: float | None) -> str:
    """``30d``, ``12h``, ``90s``...: the largest unit that divides it; ``forever`` for None."""
    if seconds is None:
        return FOREVER
    for unit in "wdhm":
        n = seconds / UNITS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{seconds:g}s"


def _duration(text: str) -> float | None:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _target_keep(text: str) -> tuple[str, float | None]:
    target_id, equals, duration = text.rpartition("=")
    if not equals or not target_id:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not TARGET=DURATION (for example bridge=90d, or bridge=forever)"
        )
    try:
        return target_id, parse_duration(duration)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{target_id}: {e}") from None


def _chunk(text: str) -> int:
    try:
        n = int(text)
        Retention(chunk=n)
    except (ValueError, ConfigurationError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a chunk size: give an integer from 1 to 100000"
        ) from None
    return n


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``relayer purge`` to ``parser``."""
    dbcli.add_database_option(parser)
    parser.add_argument(
        "--keep",
        required=True,
        type=_duration,
        metavar="DURATION",
        help=(
            "how long a target keeps an event after it became final there (delivered, expired "
            "or discarded): seconds, or 45s, 90m, 12h, 30d, 1w, 1d12h; 'forever' keeps them at "
            "every target without a --target-keep of its own"
        ),
    )
    parser.add_argument(
        "--target-keep",
        action="append",
        type=_target_keep,
        default=[],
        metavar="TARGET=DURATION",
        help=(
            "a target's own retention, instead of --keep (a scheduler's TargetConfig.retention); "
            "repeat for each target; DURATION may be 'forever'"
        ),
    )
    parser.add_argument(
        "--archive",
        action="store_true",
        help=(
            "move the events to the archive tables instead of deleting them: their status "
            "stays readable, and their ids stay taken"
        ),
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help=(
            "change nothing; report what would go (a transaction record whose events would go "
            "over several chunks is not counted)"
        ),
    )
    parser.add_argument(
        "--chunk",
        type=_chunk,
        default=Retention().chunk,
        metavar="N",
        help=(
            "about how many event numbers one database transaction looks at (default %(default)s)"
        ),
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON on stdout (progress still goes to stderr)",
    )
    parser.set_defaults(func=run)


def _fail(message: str, status: int = EXIT_FAILED) -> int:
    print(f"{_COMMAND}: {message}", file=sys.stderr)
    return status


def _policy(rule: RetentionRule) -> str:
    own = ", ".join(f"{t} {format_duration(k)}" for t, k in sorted(rule.per_target.items()))
    return f"keep {format_duration(rule.default)}" + (f" ({own})" if own else "")


def _verb(report: PurgeReport) -> str:
    verb = "archive" if report.archived else "purge"
    return f"would {verb}" if report.dry_run else f"{verb}d"


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _progress(report: PurgeReport) -> None:
    print(
        f"{_COMMAND}: chunk {report.chunks}: {_verb(report)} {_plural(report.events, 'event')} "
        f"so far, {_plural(report.transactions, 'transaction record')}, "
        f"{_plural(report.expired, 'expiry record')}",
        file=sys.stderr,
        flush=True,
    )


def summary(report: PurgeReport, where: str) -> str:
    """The report, as the command prints it."""
    lines = [
        f"{where}: {'dry run, nothing changed: ' if report.dry_run else ''}{_verb(report)} "
        f"{_plural(report.events, 'event')}, "
        f"{_plural(report.transactions, 'transaction record')} and "
        f"{_plural(report.expired, 'expiry record')}, in {_plural(report.chunks, 'chunk')}"
    ]
    width = max((len(t) for t in report.by_target), default=0)
    for target_id, n in sorted(report.by_target.items()):
        lines.append(f"  {target_id:<{width}}  {_plural(n, 'event')}")
    if report.not_final:
        lines.append(
            f"kept {_plural(report.not_final, 'event')} old enough to go but not final at "
            "every target yet (pending, awaiting confirmation or dead-lettered)"
        )
    return "\n".join(lines)


def _as_json(report: PurgeReport) -> str:
    fields = attrs.asdict(report)
    fields["by_target"] = dict(sorted(report.by_target.items()))
    return json.dumps(fields)


def run(args: argparse.Namespace) -> int:
    """Run ``relayer purge``; return the exit status."""
    per_target: dict[str, float | None] = {}
    for target_id, keep in args.target_keep:
        if target_id in per_target:
            return _fail(f"--target-keep {target_id}= is given twice", EXIT_USAGE)
        per_target[target_id] = keep
    rule = RetentionRule(args.keep, per_target)
    if rule.shortest() is None:
        return _fail(
            "nothing to do: every target keeps its final events for ever; give --keep a "
            "duration, or a --target-keep TARGET=DURATION",
            EXIT_USAGE,
        )
    database = dbcli.database_of(args, _COMMAND)
    if database is None:
        return EXIT_USAGE
    where = dbcli.safe_url(database)
    try:
        problem, found = dbcli.problem_of(database, "purge", per_target)
        if found is None:
            return _fail(f"{where}: {problem}")
        unknown = sorted(set(per_target) - found.known)
        if unknown:
            return _fail(
                f"--target-keep names {_plural(len(unknown), 'target')} that {where} does not "
                f"know: {', '.join(unknown)} (its targets: {found.targets_text()})",
                EXIT_USAGE,
            )
        return _purge(args, database, where, rule)
    except SchemaVersionError as e:
        return _fail(f"{where}: {e}")
    except sa.exc.SQLAlchemyError as e:
        return _fail(f"cannot use {where}: {dbcli.error_message(e)}")
    except RelayerError as e:
        return _fail(f"{where}: {e}")


def _purge(args: argparse.Namespace, database: str, where: str, rule: RetentionRule) -> int:
    """Open the store, run retention, print the report."""
    now = time.time()
    mode = ("dry run, " if args.dry_run else "") + ("archive" if args.archive else "purge")
    print(
        f"{_COMMAND}: {where}: {mode}, {_policy(rule)}, as of "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))}",
        file=sys.stderr,
        flush=True,
    )
    store = dbcli.open_store(database)
    last: list[PurgeReport] = []

    def progress(report: PurgeReport) -> None:
        last[:] = [report]
        _progress(report)

    try:
        # The schema was checked; this starts the store, checking it again in a transaction
        # that only reads (a dry run never waits for a scheduler's write lock).
        dbcli.wait(store.open(upgrade=False))
        report = dbcli.wait(
            store.purge(
                rule,
                now,
                archive=args.archive,
                dry_run=args.dry_run,
                chunk=args.chunk,
                progress=progress,
            )
        )
    except KeyboardInterrupt:
        done = last[0] if last else PurgeReport(archived=args.archive, dry_run=args.dry_run)
        print(summary(done, where), file=sys.stderr)
        return _fail(
            "interrupted: the chunks above are done; the one under way was rolled back",
            EXIT_INTERRUPTED,
        )
    except RelayerError as e:
        if last:
            print(summary(last[0], where), file=sys.stderr)
        return _fail(f"{where}: {e}" + (" (the chunks above are done)" if last else ""))
    finally:
        dbcli.wait(store.close())
    print(_as_json(report) if args.json else summary(report, where))
    if report.stopped:
        return _fail(
            "stopped before the end: another process's retention run is under way; "
            "run again later to go on",
            EXIT_STOPPED,
        )
    return EXIT_OK


__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "configure_parser",
    "format_duration",
    "parse_duration",
    "run",
    "summary",
]
