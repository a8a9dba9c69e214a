"""
Fault injection at relayer's persistence points, for crash tests.

The library calls :func:`checkpoint` with a name at each point where durable state changes
or is about to be acted on. Normally nothing is installed and a checkpoint is one global read
and a comparison. A crash test installs a hook, for example one that kills its own process with
``SIGKILL`` at the Nth pass of a chosen point, and then checks that a restart on the same
database loses nothing.

The points, in the order an event meets them:

- ``submit.stored``: a write of submitted events committed; their submit Deferreds have not
  fired yet (reactor thread).
- ``txn.stored``: a transaction was claimed (formed and stored, or taken again from the store)
  and is about to be sent (reactor thread).
- ``send.started``: the transport's send of a transaction started; the request is in flight
  (reactor thread).
- ``send.accepted``: the target accepted a transaction; its completion is not recorded yet
  (reactor thread).
- ``backoff.write``: inside the database transaction that marks a target DOWN with its backoff
  state, before it commits (database thread).
- ``up.transition``: inside the database transaction of a claim that found nothing left and marks
  a DOWN target UP, before it commits (database thread).
- ``lease.acquired``: a lease round took the leases of targets (at start, from a process that
  died or gave them up); their deliveries have not started yet (reactor thread).

A hook may run on the database thread, so it must be thread-safe; ``os.kill`` is. It should not
raise: an exception from it goes wherever an error at that point of the code would go.

This module is private: it is for relayer's own tests, and may change without notice.
"""

from __future__ import annotations

from collections.abc import Callable

#: The names of the checkpoints the library passes.
POINTS = (
    "submit.stored",
    "txn.stored",
    "send.started",
    "send.accepted",
    "backoff.write",
    "up.transition",
    "lease.acquired",
)

_hook: Callable[[str], None] | None = None


def install(hook: Callable[[str], None] | None) -> None:
    """
    Install ``hook``, to be called with the name of every checkpoint passed; None removes it.

    Only one hook is installed at a time: installing one replaces the previous one.
    """
    global _hook
    _hook = hook


def checkpoint(name: str) -> None:
    """Pass the checkpoint ``name``: call the installed hook, if any, with it."""
    hook = _hook
    if hook is not None:
        hook(name)
