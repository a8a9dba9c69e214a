"""
Finding the extensions that a configuration names by a string.

A target names its wire format (:attr:`relayer.TargetConfig.format`); :func:`wire_format`
finds it: among the formats given to the :class:`~relayer.Scheduler`, then the built-in ones.
"""

from __future__ import annotations

from collections.abc import Mapping

from relayer.errors import InvalidTarget
from relayer.formats import BUILTIN_FORMATS, IWireFormat


def wire_format(name: str, extra: Mapping[str, IWireFormat] | None = None) -> IWireFormat:
    """
    The wire format of this name.

    Args:
        name: The format's name, as :attr:`relayer.TargetConfig.format` gives it.
        extra: Formats by name, looked at first: the scheduler's ``formats``.

    Returns:
        The format.

    Raises:
        relayer.errors.InvalidTarget: No format has this name; the message lists the known
            ones.
    """
    if extra is not None and name in extra:
        return extra[name]
    builtin = BUILTIN_FORMATS.get(name)
    if builtin is not None:
        return builtin
    known = sorted({*BUILTIN_FORMATS, *(extra or {})})
    raise InvalidTarget(f"unknown wire format {name!r}; known: {', '.join(known)}")


__all__ = ["wire_format"]
