"""
Plugins: wire formats and retry policies from other distributions, through entry points.

A distribution provides a plugin by declaring an entry point in one of relayer's groups:

=====================  ===================================================================
Group                  What the entry point names
=====================  ===================================================================
``relayer.formats``    A wire format (:class:`relayer.IWireFormat`), by the name that
                       :attr:`relayer.TargetConfig.format` gives
``relayer.policies``   A retry policy (:class:`relayer.IRetryPolicy`), by the name that
                       :attr:`relayer.TargetConfig.retry_policy` gives
=====================  ===================================================================

The entry point's object is either a provider of the interface, or a class or function that
takes no argument and returns one. It is loaded when a target first names it, checked with
:func:`zope.interface.verify.verifyObject`, and kept for the life of the process. For example,
in a plugin's ``pyproject.toml``::

    [project.entry-points."relayer.policies"]
    patient = "my_plugin.policies:PatientPolicy"

A plugin that fails to load, or does not provide its interface, is refused with an
:class:`relayer.errors.InvalidTarget` that names the entry point and its distribution; two
distributions providing the same name are refused too, since which one would be used is not
up to relayer.
"""

from __future__ import annotations

import importlib.metadata
import threading
from collections.abc import Mapping
from typing import Any

from zope.interface.interface import InterfaceClass
from zope.interface.verify import verifyObject

from relayer.errors import InvalidTarget
from relayer.formats import BUILTIN_FORMATS, IWireFormat
from relayer.policy import IRetryPolicy

#: The entry point group of wire formats.
FORMATS_GROUP = "relayer.formats"
#: The entry point group of retry policies.
POLICIES_GROUP = "relayer.policies"

_loaded: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def available(group: str) -> dict[str, str]:
    """
    The plugins installed in an entry point group: by name, the distribution and the object
    each names (``"my-plugin: my_plugin.policies:PatientPolicy"``). Nothing is loaded.
    """
    found: dict[str, str] = {}
    for ep in importlib.metadata.entry_points(group=group):
        found[ep.name] = f"{_distribution(ep)}: {ep.value}"
    return found


def load(group: str, name: str, interface: InterfaceClass, what: str) -> Any:
    """
    The plugin ``name`` of ``group``, which must provide ``interface``.

    Args:
        group: The entry point group.
        name: The plugin's name.
        interface: The interface it must provide.
        what: What it is, for messages: ``"wire format"``, ``"retry policy"``.

    Raises:
        InvalidTarget: No plugin of that name is installed, two are, or it does not load or
            does not provide ``interface``.
    """
    with _lock:
        found = _loaded.get((group, name))
        if found is not None:
            return found
        matches = [ep for ep in importlib.metadata.entry_points(group=group) if ep.name == name]
        if not matches:
            known = sorted(available(group))
            listed = ", ".join(repr(k) for k in known) if known else "none is installed"
            raise _Unknown(
                f"unknown {what} {name!r}: no plugin provides one by that name in the entry "
                f"point group {group!r} (installed: {listed})"
            )
        if len({(ep.value, _distribution(ep)) for ep in matches}) > 1:
            sources = "; ".join(f"{_distribution(ep)} ({ep.value})" for ep in matches)
            raise InvalidTarget(
                f"the {what} {name!r} is provided by more than one plugin: {sources}; "
                "uninstall all but one"
            )
        ep = matches[0]
        source = f"the {what} {name!r} of the plugin {_distribution(ep)} ({ep.value})"
        try:
            obj = ep.load()
        except Exception as e:
            raise InvalidTarget(f"{source} failed to load: {type(e).__name__}: {e}") from e
        if not interface.providedBy(obj) and callable(obj):
            try:
                obj = obj()
            except Exception as e:
                raise InvalidTarget(
                    f"{source} failed to make its {what}: {type(e).__name__}: {e}"
                ) from e
        try:
            verifyObject(interface, obj)
        except Exception as e:
            raise InvalidTarget(
                f"{source} does not provide {interface.__module__}.{interface.__name__}: {e}"
            ) from None
        _loaded[(group, name)] = obj
        return obj


def wire_format(name: str, extra: Mapping[str, IWireFormat] | None = None) -> IWireFormat:
    """
    The wire format of this name: among ``extra`` (the scheduler's ``formats``), then the
    built-in ones, then the plugins'.

    Raises:
        InvalidTarget: No format has this name (the message lists the known ones), or its
            plugin is broken (see :func:`load`).
    """
    if extra is not None and name in extra:
        return extra[name]
    builtin = BUILTIN_FORMATS.get(name)
    if builtin is not None:
        return builtin
    try:
        found: IWireFormat = load(FORMATS_GROUP, name, IWireFormat, "wire format")
    except _Unknown:
        known = sorted({*BUILTIN_FORMATS, *(extra or {}), *available(FORMATS_GROUP)})
        raise InvalidTarget(f"unknown wire format {name!r}; known: {', '.join(known)}") from None
    return found


def retry_policy(name: str) -> IRetryPolicy:
    """
    The retry policy that a plugin provides under ``name``.

    Raises:
        InvalidTarget: See :func:`load`.
    """
    policy: IRetryPolicy = load(POLICIES_GROUP, name, IRetryPolicy, "retry policy")
    return policy


class _Unknown(InvalidTarget):
    """No plugin provides the name."""


def forget() -> None:
    """Forget the plugins loaded so far, so that the next use finds them again."""
    with _lock:
        _loaded.clear()


def _distribution(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "(unknown distribution)"


__all__ = ["available", "forget", "load", "retry_policy", "wire_format"]
