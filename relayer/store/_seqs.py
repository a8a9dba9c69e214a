"""
The stored form of a list of event sequence numbers: ranges, as text.

A run of the queue or a transaction names its events by sequence number. Events submitted
together get consecutive numbers, so the list is nearly always one range or a few:
``"10-20,25,30-41"``. The order of the list is kept as it is (it is the target's order), and
a list need not be increasing.
"""

from __future__ import annotations

from collections.abc import Sequence


def encode(seqs: Sequence[int]) -> str:
    """The text of a non-empty list of sequence numbers."""
    parts: list[str] = []
    it = iter(seqs)
    try:
        start = end = next(it)
    except StopIteration:
        raise ValueError("an empty list of sequence numbers") from None
    for s in it:
        if s == end + 1:
            end = s
            continue
        parts.append(f"{start}-{end}" if end != start else str(start))
        start = end = s
    parts.append(f"{start}-{end}" if end != start else str(start))
    return ",".join(parts)


def decode(text: str) -> list[int]:
    """The sequence numbers that :func:`encode` wrote as ``text``."""
    out: list[int] = []
    for part in text.split(","):
        low, sep, high = part.partition("-")
        if sep:
            out.extend(range(int(low), int(high) + 1))
        else:
            out.append(int(low))
    return out


def ranges(text: str) -> list[tuple[int, int]]:
    """The ranges of ``text``, as ``(first, last)`` pairs, both included."""
    out = []
    for part in text.split(","):
        low, sep, high = part.partition("-")
        out.append((int(low), int(high) if sep else int(low)))
    return out


def contains(text: str, seq: int) -> bool:
    """Whether the list ``text`` holds ``seq``."""
    return any(low <= seq <= high for low, high in ranges(text))
