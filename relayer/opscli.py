"""
Operator commands: see and steer delivery from the command line, while the schedulers run.

- ``relayer status [--target T] [--json]``: each target's state and backlog.
- ``relayer wake TARGET [--wait SECONDS]``: retry a target now, in whichever process delivers
  to it.
- ``relayer replay TARGET [--txn N]``: queue a target's dead letters (or one of them) again.
- ``relayer discard TARGET --txn N``: give up a dead letter for good.
- ``relayer dead-letters TARGET``: list a target's dead letters.
- ``relayer events --target T --state S [--since TIME] [--until TIME]``: list a target's
  events in one state.
- ``relayer event ID``: where one event stands at each of its targets.

They act through the database alone (a SQLite file or a PostgreSQL database, from
``--database`` or ``$RELAYER_DATABASE_URL``), beside the running schedulers: they take no
process lock, never create a database and never upgrade a schema. What they change is picked
up by the scheduler that delivers to the target: at once on PostgreSQL (the store sends a
``NOTIFY``), within its sweep interval on SQLite. A wake is a durable command in the database:
a scheduler that is not running applies it when it starts.

Lists are read from the store a page at a time and printed as they come, so that memory stays
bounded however many targets, events or dead letters there are. With ``--json`` a command
prints JSON lines: one object per target, event or dead letter (``relayer event`` prints one
object).

Times in the store are on the schedulers' clock, which is the wall clock in production: the
commands show them as ages and delays from ``time.time()`` now (and, with ``--json``, as Unix
times too).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import attrs
import sqlalchemy as sa

from relayer import dbcli
from relayer.errors import RelayerError
from relayer.store import SQLStore, TargetRecord, TargetState
from relayer.store.base import (
    Command,
    DeadLetter,
    DeliveryState,
    EventEntry,
    EventStatus,
    QueueCounts,
)

#: The exit statuses, the same as ``relayer purge``'s.
EXIT_OK = 0
#: The database could not be used (no such file, unreachable, another schema version), or an
#: operation on it failed.
EXIT_FAILED = 1
#: The command line is not valid, or names a target, an event or a dead letter that the
#: database does not know.
EXIT_USAGE = 2
#: ``relayer wake --wait``: the wake was not applied in time (it stays queued).
EXIT_TIMED_OUT = 3
#: Interrupted (Ctrl-C).
EXIT_INTERRUPTED = 130

#: How many targets ``relayer status`` reads from the store at a time.
STATUS_PAGE = 500
#: How many dead letters ``relayer dead-letters`` reads at a time (each with its events).
DEAD_LETTERS_PAGE = 50
#: How many events ``relayer events`` reads at a time.
EVENTS_PAGE = 500
#: How often ``relayer wake --wait`` looks whether its command was applied, in seconds.
WAIT_POLL = 0.2
#: How many event ids a line of ``relayer dead-letters`` shows.
SHOWN_IDS = 3

#: The commands' epilog: where the output goes, and the exit statuses.
_EXITS = (
    "Exit status: 0 done, 1 the database could not be used (no such file, unreachable, another "
    "schema version) or failed, 2 bad usage or {unknown}, {timed_out}130 interrupted."
)
_DATABASE = (
    "The database comes from --database or $RELAYER_DATABASE_URL; it is never created and its "
    "schema never upgraded, and the URL's password is never printed."
)


class _Refused(Exception):
    """A command cannot go on: its one-line message, and its exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@attrs.frozen
class _Run:
    """What a command runs with."""

    args: argparse.Namespace
    database: str
    store: SQLStore
    where: str
    found: dbcli.Inspection
    now: float
    out: TextIO

    def print(self, line: str) -> None:
        self.out.write(line + "\n")

    def json(self, document: Any) -> None:
        self.out.write(json.dumps(document) + "\n")


# -- parsers -------------------------------------------------------------------------------------


def _epilog(unknown: str, timed_out: str = "") -> str:
    return f"{_DATABASE} " + _EXITS.format(unknown=unknown, timed_out=timed_out)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _txn_id(text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise argparse.ArgumentTypeError(f"{text!r} is not a transaction id (a whole number)")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 1 up")
    return int(text)


def _state(text: str) -> DeliveryState:
    try:
        return DeliveryState(text.strip().lower().replace("-", "_"))
    except ValueError:
        choices = ", ".join(s.value for s in DeliveryState)
        raise argparse.ArgumentTypeError(f"{text!r} is not a state: one of {choices}") from None


def parse_time(text: str, now: float) -> float:
    """
    A time given on the command line, as a Unix time: a duration ago (``90s``, ``30m``,
    ``12h``, ``7d``, ``1d12h``), an ISO 8601 date or time (``2024-05-01``,
    ``2024-05-01T12:00:00Z``, UTC unless it says otherwise), or a Unix time (``1714564800``).

    Raises:
        ValueError: ``text`` is none of these.
    """
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    from relayer.purgecli import parse_duration

    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        return now - seconds
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give a duration ago (30m, 12h, 7d), an ISO 8601 time "
            "(2024-05-01T12:00:00Z) or a Unix time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _add_json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what}")


def configure_parsers(commands: Any) -> None:
    """
    Add the operator commands to the ``relayer`` command's sub-parsers.

    Args:
        commands: What :meth:`argparse.ArgumentParser.add_subparsers` returned.
    """
    status = commands.add_parser(
        "status",
        help="each target's state and backlog",
        description=(
            "Show each target's state (UP, DOWN, BLOCKED, DISABLED), its pending events and "
            "transactions, the age of its oldest pending event, since when it has been DOWN, "
            "when it is retried next, its last error and its dead letters: a table, a page of "
            "targets at a time, in the order of their ids, and a summary."
        ),
        epilog=_epilog("a target the database does not know"),
    )
    status.add_argument("--target", metavar="TARGET", help="show this target only")
    _add_json(status, "one JSON object per target (JSON lines), and no summary")

    wake = commands.add_parser(
        "wake",
        help="retry a target now, in whichever process delivers to it",
        description=(
            "Retry a target now: a DOWN target's backoff is cut short, a BLOCKED or DISABLED "
            "one is retried. The wake is recorded in the database as a command, which the "
            "scheduler that delivers to the target applies at once on PostgreSQL (NOTIFY), "
            "at its next sweep on SQLite, or when it starts if none is running."
        ),
        epilog=_epilog(
            "a target the database does not know",
            "3 --wait's time ran out before a scheduler applied the wake (it stays queued), ",
        ),
    )
    wake.add_argument("target", metavar="TARGET", help="the target's id")
    wake.add_argument(
        "--wait",
        type=_positive_float,
        metavar="SECONDS",
        help="wait up to this long for a scheduler to apply the wake, and say which did",
    )
    _add_json(wake, "the command as JSON")

    replay = commands.add_parser(
        "replay",
        help="queue a target's dead letters again",
        description=(
            "Queue a target's dead letters (or, with --txn, one of them) again, at the end of "
            "its queue, to be delivered by the scheduler that delivers to the target: at once "
            "on PostgreSQL, within its sweep interval on SQLite."
        ),
        epilog=_epilog(
            "a target the database does not know, or a --txn that is not one of its dead letters"
        ),
    )
    replay.add_argument("target", metavar="TARGET", help="the target's id")
    replay.add_argument(
        "--txn", type=_txn_id, metavar="N", help="replay only the dead letter with this id"
    )
    _add_json(replay, "the result as JSON")

    discard = commands.add_parser(
        "discard",
        help="give up a dead letter for good",
        description=(
            "Give up one of a target's dead letters: its events are recorded as discarded "
            "there, and never sent again."
        ),
        epilog=_epilog(
            "a target the database does not know, or a --txn that is not one of its dead letters"
        ),
    )
    discard.add_argument("target", metavar="TARGET", help="the target's id")
    discard.add_argument(
        "--txn", type=_txn_id, required=True, metavar="N", help="the dead letter's id"
    )
    _add_json(discard, "the result as JSON")

    dead = commands.add_parser(
        "dead-letters",
        help="list a target's dead letters",
        description=(
            "List a target's dead letters, oldest first, one line each: its transaction id, "
            "its events, its attempts, when and why it failed."
        ),
        epilog=_epilog("a target the database does not know"),
    )
    dead.add_argument("target", metavar="TARGET", help="the target's id")
    _add_json(dead, "one JSON object per dead letter (JSON lines), with all its event ids")

    events = commands.add_parser(
        "events",
        help="list a target's events in one state",
        description=(
            "List a target's events in one state, oldest first (in the target's order), one "
            "line each. States: " + ", ".join(s.value for s in DeliveryState) + "."
        ),
        epilog=(
            "TIME is a duration ago (30m, 12h, 7d), an ISO 8601 time (2024-05-01T12:00:00Z; "
            "UTC unless it says otherwise) or a Unix time; the window is of when the events "
            "reached their state, so it is refused for pending events and those awaiting "
            "confirmation. " + _epilog("a target the database does not know")
        ),
    )
    events.add_argument("--target", required=True, metavar="TARGET")
    events.add_argument("--state", required=True, type=_state, metavar="STATE")
    events.add_argument("--since", metavar="TIME", help="only those that reached it since TIME")
    events.add_argument("--until", metavar="TIME", help="only those that reached it before TIME")
    events.add_argument("--limit", type=_count, metavar="N", help="list at most N events")
    _add_json(events, "one JSON object per event (JSON lines)")

    event = commands.add_parser(
        "event",
        help="where one event stands at each of its targets",
        description=(
            "Show one event (by the id it was submitted with, or relayer-N for an event "
            "without one): when it was submitted, and where it stands at each of its targets."
        ),
        epilog=_epilog("an event the database does not know"),
    )
    event.add_argument(
        "event_id", metavar="ID", help="the event's id, or relayer-N for one submitted without"
    )
    _add_json(event, "the event as one JSON object")

    for name, parser in (
        ("status", status),
        ("wake", wake),
        ("replay", replay),
        ("discard", discard),
        ("dead-letters", dead),
        ("events", events),
        ("event", event),
    ):
        dbcli.add_database_option(parser)
        parser.set_defaults(func=run, ops_command=name)


# -- running -------------------------------------------------------------------------------------


def _targets_of(args: argparse.Namespace) -> list[str]:
    """The target the command names, if it names one."""
    target = getattr(args, "target", None)
    return [target] if target is not None else []


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run an operator command; return the exit status."""
    name = args.ops_command
    command = f"relayer {name}"
    stdout = out if out is not None else sys.stdout

    def fail(message: str, status: int = EXIT_FAILED) -> int:
        print(f"{command}: {message}", file=sys.stderr)
        return status

    database = dbcli.database_of(args, command)
    if database is None:
        return EXIT_USAGE
    where = dbcli.safe_url(database)
    try:
        problem, found = dbcli.problem_of(database, name, _targets_of(args))
        if found is None:
            return fail(f"{where}: {problem}")
        for target_id in _targets_of(args):
            if target_id not in found.known:
                return fail(
                    f"{where} has no target {target_id!r} (its targets: {found.targets_text()})",
                    EXIT_USAGE,
                )
        store = dbcli.open_store(database)
        try:
            dbcli.wait(store.open(upgrade=False))
            run = _Run(args, database, store, where, found, time.time(), stdout)
            status: int = _COMMANDS[name](run)
            stdout.flush()
            return status
        finally:
            dbcli.wait(store.close())
    except _Refused as e:
        return fail(e.message, e.status)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (``relayer events ... | head``): say nothing more.
        _quiet_stdout()
        return EXIT_OK
    except sa.exc.SQLAlchemyError as e:
        return fail(f"cannot use {where}: {dbcli.error_message(e)}")
    except RelayerError as e:
        return fail(f"{where}: {e}")


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


# -- formatting ----------------------------------------------------------------------------------


def span(seconds: float) -> str:
    """A duration, short: ``0.4s``, ``12s``, ``3m05s``, ``2h10m``, ``3d04h``."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def ago(at: float | None, now: float) -> str:
    """``5m12s ago``, ``-`` for None."""
    if at is None:
        return "-"
    if at > now:
        return f"in {span(at - now)}"
    return f"{span(now - at)} ago"


def due(at: float | None, now: float) -> str:
    """``in 3.2s`` (``due`` if it is past), ``-`` for None."""
    if at is None:
        return "-"
    if at <= now:
        return "due"
    return f"in {span(at - now)}"


def utc(at: float) -> str:
    """``2024-05-01T12:00:00Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _since(at: float | None, now: float) -> float | None:
    return None if at is None else round(now - at, 3)


class _Table:
    """
    Rows printed as they come, in columns as wide as the widest cell so far: the first page
    sets the widths, a wider cell later widens its column from then on. The last column is
    not padded.
    """

    def __init__(self, out: _Run, headers: Sequence[str], widths: Sequence[int] = ()) -> None:
        self._out = out
        self._headers = list(headers)
        wanted = [*widths, *[0] * (len(headers) - len(widths))]
        self._widths = [max(len(h), w) for h, w in zip(headers, wanted, strict=True)]
        self._printed_header = False

    def page(self, rows: Sequence[Sequence[str]]) -> None:
        for row in rows:
            self._widths = [max(w, len(c)) for w, c in zip(self._widths, row, strict=True)]
        if not self._printed_header:
            self._line(self._headers)
            self._printed_header = True
        for row in rows:
            self._line(row)

    def _line(self, cells: Sequence[str]) -> None:
        padded = [c.ljust(w) for c, w in zip(cells[:-1], self._widths[:-1], strict=True)]
        self._out.print("  ".join([*padded, cells[-1]]).rstrip())


# -- status --------------------------------------------------------------------------------------


def _status_pages(run: _Run) -> Iterator[list[tuple[QueueCounts, TargetRecord]]]:
    """The targets' counts and records, a page at a time, in the order of their ids."""
    target = run.args.target
    if target is not None:
        records = dbcli.wait(run.store.load_targets([target]))
        # One target's counts: the page of ids from just below it, cut to it.
        # The page of one target that starts with it.
        before = run.found.before.get(target)
        counts = dbcli.wait(run.store.queue_counts(after=before, limit=1))
        yield [(counts.get(target, QueueCounts()), records[target])]
        return
    after: str | None = None
    while True:
        counts = dbcli.wait(run.store.queue_counts(after=after, limit=STATUS_PAGE))
        if not counts:
            return
        ids = sorted(counts)
        records = dbcli.wait(run.store.load_targets(ids))
        yield [(counts[t], records[t]) for t in ids if t in records]
        if len(ids) < STATUS_PAGE:
            return
        after = ids[-1]


def _status_json(counts: QueueCounts, record: TargetRecord, now: float) -> dict[str, Any]:
    return {
        "target": record.target_id,
        "state": record.state.value,
        "failures": record.failures,
        "pending_events": counts.pending_events,
        "pending_transactions": counts.pending_transactions,
        "oldest_pending_at": counts.oldest_pending_at,
        "oldest_pending_age": _since(counts.oldest_pending_at, now),
        "down_since": record.down_since,
        "down_for": _since(record.down_since, now),
        "next_attempt_at": record.next_attempt_at,
        "next_attempt_in": (
            None if record.next_attempt_at is None else round(record.next_attempt_at - now, 3)
        ),
        "last_success_at": record.last_success_at,
        "last_error": record.last_error,
        "dead_letters": counts.dead_letters,
    }


#: The columns of ``relayer status``.
STATUS_COLUMNS = [
    "TARGET",
    "STATE",
    "EVENTS",
    "TXNS",
    "OLDEST",
    "DOWN SINCE",
    "NEXT RETRY",
    "DEAD",
    "LAST ERROR",
]


def _status_row(counts: QueueCounts, record: TargetRecord, now: float) -> list[str]:
    down = record.down_since if record.state is not TargetState.UP else None
    oldest = counts.oldest_pending_at
    return [
        record.target_id,
        record.state.name,
        str(counts.pending_events),
        str(counts.pending_transactions),
        span(now - oldest) if oldest is not None else "-",
        ago(down, now),
        due(record.next_attempt_at, now),
        str(counts.dead_letters),
        _one_line(record.last_error) if record.last_error else "-",
    ]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _status(run: _Run) -> int:
    now = run.now
    # The target column is as wide as the longest target id, whichever page it is on.
    table = _Table(run, STATUS_COLUMNS, [run.found.longest_target_id, 8])
    n = 0
    by_state: dict[str, int] = {}
    events = dead = 0
    for page in _status_pages(run):
        if run.args.json:
            for counts, record in page:
                run.json(_status_json(counts, record, now))
            continue
        table.page([_status_row(c, r, now) for c, r in page])
        for counts, record in page:
            n += 1
            by_state[record.state.name] = by_state.get(record.state.name, 0) + 1
            events += counts.pending_events
            dead += counts.dead_letters
    if run.args.json:
        return EXIT_OK
    if n == 0:
        table.page([])
    if run.args.target is None:
        states = ", ".join(
            f"{by_state[k]} {k}" for k in ("UP", "DOWN", "BLOCKED", "DISABLED") if k in by_state
        )
        run.print(
            f"{_plural(n, 'target')}"
            + (f" ({states})" if states else "")
            + f", {_plural(events, 'pending event')}, {_plural(dead, 'dead letter')}"
        )
    return EXIT_OK


# -- wake ----------------------------------------------------------------------------------------


def _wake(run: _Run) -> int:
    target = run.args.target
    store = run.store
    command_id = dbcli.wait(store.add_command(target, "wake", run.now))
    later = (
        "at once, through NOTIFY"
        if dbcli.is_postgres(run.database)
        else "at its next sweep (within its sweep_interval)"
    )
    if run.args.wait is None:
        if run.args.json:
            run.json({"command_id": command_id, "target": target, "action": "wake", "done": False})
        else:
            run.print(
                f"wake {target}: queued as command {command_id}; the scheduler that delivers "
                f"to {target} applies it {later}, or when it starts if none is running"
            )
        return EXIT_OK
    try:
        command = _wait_for(run, command_id)
    except KeyboardInterrupt:
        raise _Refused(
            f"interrupted: the wake of {target} stays queued as command {command_id}",
            EXIT_INTERRUPTED,
        ) from None
    if command is None:
        if run.args.json:
            run.json({"command_id": command_id, "target": target, "action": "wake", "done": False})
        raise _Refused(
            f"command {command_id} (wake {target}) was not applied within "
            f"{run.args.wait:g}s: is a scheduler that delivers to {target} running? The "
            "command stays queued, to be applied when one runs",
            EXIT_TIMED_OUT,
        )
    if run.args.json:
        run.json(
            {
                "command_id": command_id,
                "target": target,
                "action": "wake",
                "done": True,
                "done_at": command.done_at,
                "done_by": command.done_by,
                "result": command.result,
            }
        )
    else:
        run.print(
            f"wake {target}: command {command_id} applied by {command.done_by} "
            f"{ago(command.done_at, time.time())}: {command.result}"
        )
    return EXIT_OK


def _wait_for(run: _Run, command_id: int) -> Command | None:
    """The command once a scheduler has applied it; None if none has within ``--wait``."""
    deadline = time.monotonic() + run.args.wait
    while True:
        command = dbcli.wait(run.store.command(command_id))
        if command is not None and command.done:
            return command
        if time.monotonic() >= deadline:
            return None
        time.sleep(WAIT_POLL)


# -- replay and discard --------------------------------------------------------------------------


def _replay(run: _Run) -> int:
    target, txn_id = run.args.target, run.args.txn
    n = dbcli.wait(run.store.replay(target, run.now, txn_id=txn_id))
    if txn_id is not None and n == 0:
        raise _Refused(f"transaction {txn_id} is not a dead letter of {target}")
    if run.args.json:
        run.json({"target": target, "txn_id": txn_id, "replayed_events": n})
    elif n == 0:
        run.print(f"{target} has no dead letters to replay")
    else:
        what = f"dead letter {txn_id}" if txn_id is not None else "its dead letters"
        run.print(
            f"replayed {what} at {target}: {_plural(n, 'event')} queued again, at the end of "
            "its queue"
        )
    return EXIT_OK


def _discard(run: _Run) -> int:
    target, txn_id = run.args.target, run.args.txn
    if not dbcli.wait(run.store.discard(target, txn_id, run.now)):
        raise _Refused(f"transaction {txn_id} is not a dead letter of {target}")
    if run.args.json:
        run.json({"target": target, "txn_id": txn_id, "discarded": True})
    else:
        run.print(f"discarded dead letter {txn_id} at {target}: its events are never sent again")
    return EXIT_OK


# -- dead letters --------------------------------------------------------------------------------


def _dead_letter_line(dead: DeadLetter, now: float) -> str:
    ids = list(dead.event_ids[:SHOWN_IDS])
    more = dead.n_events - len(ids)
    shown = ", ".join(ids) + (f" and {more} more" if more > 0 else "")
    return (
        f"txn {dead.txn_id}: {_plural(dead.n_events, 'event')} ({shown}), "
        f"{_plural(dead.attempts, 'attempt')}, dead-lettered {ago(dead.dead_at, now)}: "
        f"{_one_line(dead.reason) or '-'}"
    )


def _dead_letters(run: _Run) -> int:
    target = run.args.target
    after: int | None = None
    n = events = 0
    while True:
        page = dbcli.wait(run.store.dead_letters(target, DEAD_LETTERS_PAGE, after=after))
        for dead in page:
            if run.args.json:
                run.json(
                    {
                        "target": dead.target_id,
                        "txn_id": dead.txn_id,
                        "attempts": dead.attempts,
                        "reason": dead.reason,
                        "dead_at": dead.dead_at,
                        "events": dead.n_events,
                        "event_ids": list(dead.event_ids),
                    }
                )
            else:
                run.print(_dead_letter_line(dead, run.now))
            n += 1
            events += dead.n_events
        if len(page) < DEAD_LETTERS_PAGE:
            break
        after = page[-1].txn_id
    if not run.args.json:
        run.print(
            f"{target}: {_plural(n, 'dead letter')}, {_plural(events, 'event')}"
            + (
                f" (relayer replay {target} [--txn N] queues them again; relayer discard "
                f"{target} --txn N gives one up)"
                if n
                else ""
            )
        )
    return EXIT_OK


# -- events --------------------------------------------------------------------------------------


_REACHED = {
    DeliveryState.DELIVERED: "delivered",
    DeliveryState.EXPIRED: "expired",
    DeliveryState.DEAD_LETTERED: "dead-lettered",
    DeliveryState.DISCARDED: "discarded",
}


def _event_line(entry: EventEntry, state: DeliveryState, now: float) -> str:
    parts = [entry.event_id, f"submitted {ago(entry.submitted_at, now)}"]
    if entry.txn_id is not None:
        parts.append(f"txn {entry.txn_id}")
    if entry.attempts:
        parts.append(
            f"{_plural(entry.attempts, 'attempt')}, last {ago(entry.last_attempt_at, now)}"
        )
    if entry.at is not None and state in _REACHED:
        parts.append(f"{_REACHED[state]} {ago(entry.at, now)}")
    return "  ".join(parts)


def _events(run: _Run) -> int:
    args = run.args
    state: DeliveryState = args.state
    since = until = None
    try:
        if args.since is not None:
            since = parse_time(args.since, run.now)
        if args.until is not None:
            until = parse_time(args.until, run.now)
    except ValueError as e:
        raise _Refused(str(e)) from None
    if (since is not None or until is not None) and state not in _REACHED:
        raise _Refused(
            f"--since and --until are for the events that reached their state at a time "
            f"(delivered, expired, dead_lettered, discarded), not {state.value} ones"
        )
    after: str | None = None
    n = 0
    limit: int | None = args.limit
    while True:
        want = EVENTS_PAGE if limit is None else min(EVENTS_PAGE, limit - n)
        page = dbcli.wait(
            run.store.target_events(args.target, state, after, want, since=since, until=until)
        )
        for entry in page.entries:
            if args.json:
                run.json(
                    {
                        "event_id": entry.event_id,
                        "target": args.target,
                        "state": state.value,
                        "submitted_at": entry.submitted_at,
                        "txn_id": entry.txn_id,
                        "attempts": entry.attempts,
                        "last_attempt_at": entry.last_attempt_at,
                        "at": entry.at,
                    }
                )
            else:
                run.print(_event_line(entry, state, run.now))
            n += 1
        after = page.next
        if after is None or (limit is not None and n >= limit):
            break
    if not args.json:
        more = " (--limit reached; there may be more)" if after is not None else ""
        run.print(f"{args.target}: {_plural(n, f'{state.value} event')}{more}")
    return EXIT_OK


# -- event ---------------------------------------------------------------------------------------


def _event_json(status: EventStatus) -> dict[str, Any]:
    return {
        "event_id": status.event_id,
        "submitted_at": status.submitted_at,
        "expires_at": status.expires_at,
        "deliveries": {
            t: {
                k: (v.value if isinstance(v, DeliveryState) else v)
                for k, v in attrs.asdict(d, recurse=False).items()
                if k != "target_id"
            }
            for t, d in sorted(status.deliveries.items())
        },
    }


def _event(run: _Run) -> int:
    status = dbcli.wait(run.store.event_status(run.args.event_id))
    if status is None:
        raise _Refused(f"{run.where} has no event {run.args.event_id!r}")
    if run.args.json:
        run.json(_event_json(status))
        return EXIT_OK
    now = run.now
    deadline = (
        f"expires {ago(status.expires_at, now)}" if status.expires_at is not None else "no deadline"
    )
    run.print(
        f"{status.event_id}: submitted {ago(status.submitted_at, now)} "
        f"({utc(status.submitted_at)}), {deadline}"
    )
    table = _Table(run, ["  TARGET", "STATE", "TXN", "ATTEMPTS", "DETAIL"])
    rows = []
    for target_id, d in sorted(status.deliveries.items()):
        detail = []
        if d.last_attempt_at is not None:
            detail.append(f"last attempt {ago(d.last_attempt_at, now)}")
        for what, at in (
            ("next retry", d.next_attempt_at),
            ("confirm by", d.confirm_by),
        ):
            if at is not None:
                detail.append(f"{what} {due(at, now)}")
        for what, at in (
            ("delivered", d.delivered_at),
            ("expired", d.expired_at),
            ("discarded", d.discarded_at),
        ):
            if at is not None:
                detail.append(f"{what} {ago(at, now)}")
        if d.reason:
            detail.append(_one_line(d.reason))
        rows.append(
            [
                f"  {target_id}",
                d.state.value,
                str(d.txn_id) if d.txn_id is not None else "-",
                str(d.attempts),
                ", ".join(detail) or "-",
            ]
        )
    table.page(rows)
    return EXIT_OK


_COMMANDS: dict[str, Callable[[_Run], int]] = {
    "status": _status,
    "wake": _wake,
    "replay": _replay,
    "discard": _discard,
    "dead-letters": _dead_letters,
    "events": _events,
    "event": _event,
}


__all__ = [
    "DEAD_LETTERS_PAGE",
    "EVENTS_PAGE",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TIMED_OUT",
    "EXIT_USAGE",
    "STATUS_COLUMNS",
    "STATUS_PAGE",
    "ago",
    "configure_parsers",
    "due",
    "parse_time",
    "run",
    "span",
]
