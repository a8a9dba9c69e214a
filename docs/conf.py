"""
Sphinx configuration for relayer's documentation.

Build it with::

    python3 -m pip install -e '.[docs]'
    python3 -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from relayer import __version__  # noqa: E402

project = "relayer"
copyright = "the relayer authors, Apache-2.0"
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    # zope.interface interfaces (IStore, ITransport): the ``autointerface`` directive.
    "repoze.sphinx.autointerface",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# Docstrings are in Google style.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True


def _name_interfaces() -> None:
    """
    Give zope.interface interfaces a ``__qualname__``, as classes have.

    Interfaces are not classes, and without it Sphinx shows an annotation that names one as
    ``<InterfaceClass twisted.internet.interfaces.IReactorTime>``.
    """
    from zope.interface.interface import InterfaceClass

    import relayer.testing  # noqa: F401 - imports every module whose annotations name one

    for name, module in list(sys.modules.items()):
        if not (name.startswith(("relayer", "twisted.")) and module is not None):
            continue
        for value in list(vars(module).values()):
            if isinstance(value, InterfaceClass) and "__qualname__" not in vars(value):
                value.__qualname__ = value.__name__


_name_interfaces()

nitpicky = False

html_theme = "alabaster"
html_title = f"relayer {release}"
html_theme_options = {
    "description": "Reliable, ordered, per-target delivery of events, on Twisted",
    "fixed_sidebar": True,
}

# The modules whose ``__all__`` is relayer's public API. Every public name must be in the API
# reference (docs/api.md); the build warns about any that is not.
PUBLIC_MODULES = [
    "relayer",
    "relayer.store",
    "relayer.transport",
    "relayer.testing",
    "relayer.errors",
    "relayer.config",
    "relayer.formats",
    "relayer.plugins",
]


def _public_names() -> list[tuple[str, str, Any]]:
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            exported = [
                n
                for n, v in vars(module).items()
                if not n.startswith("_") and getattr(v, "__module__", None) == module_name
            ]
        for name in exported:
            if name.startswith("__"):
                continue
            names.append((module_name, name, getattr(module, name)))
    return names


def _check_api_reference(app: Any, env: Any) -> None:
    """Warn about every public name that the API reference does not document."""
    from sphinx.util import logging

    log = logging.getLogger(__name__)
    documented = set(env.domains["py"].objects)
    for module_name, name, obj in _public_names():
        candidates = {f"{module_name}.{name}", f"relayer.{name}"}
        qualname = getattr(obj, "__qualname__", None)
        home = getattr(obj, "__module__", None)
        if qualname and home:
            candidates.add(f"{home}.{qualname}")
        if not candidates & documented:
            log.warning(
                "%s.%s is public but not in the API reference: add it to docs/api.md",
                module_name,
                name,
                type="relayer",
                subtype="api",
            )


def _clean_signature(
    app: Any,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    """Show the defaults of attrs classes as values, and no signature for enums and protocols."""
    import enum

    import attrs

    if what not in ("class", "exception") or signature is None or not isinstance(obj, type):
        return None
    if issubclass(obj, enum.Enum) or getattr(obj, "_is_protocol", False):
        return "", return_annotation
    if not attrs.has(obj):
        return None
    fields = attrs.fields_dict(obj)

    def value(match: re.Match[str]) -> str:
        default = fields[match.group(1)].default
        if isinstance(default, enum.Enum):
            return f"{type(default).__name__}.{default.name}"
        return repr(default)

    signature = re.sub(r"attr_dict\['(\w+)'\]\.default", value, signature)
    for field in fields.values():
        if isinstance(field.default, attrs.Factory) and not field.default.takes_self:
            made = f"{getattr(field.default.factory, '__name__', 'factory')}()"
            signature = re.sub(
                rf"(\b{re.escape(field.name)}: [^=,]*= )NOTHING", rf"\g<1>{made}", signature
            )
    return signature, return_annotation


def _lookup(dotted: str) -> Any:
    """The object at a dotted path such as ``relayer.store.base.IStore``, or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


_names_by_id: dict[int, str] = {}


def _resolve_by_identity(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """
    Resolve a reference to a relayer object by any of its names.

    The API reference documents each object once, under the name users import it by (such as
    ``relayer.IStore``); docstrings and annotations also name objects by the module that defines
    them (``relayer.store.base.IStore``) or by another module that re-exports them.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip("~.")
    module = node.get("py:module") or ""
    cls = node.get("py:class") or ""
    candidates = [target, f"{module}.{target}", f"{module}.{cls}.{target}"]
    home = getattr(_lookup(f"{module}.{cls}") if cls else None, "__module__", None)
    if home:
        # Names in a docstring are relative to the module that defines the object.
        candidates.append(f"{home}.{target}")
    candidates = [c for c in candidates if c.startswith("relayer.") and ".." not in c]
    if not candidates:
        return None
    py = env.domains["py"]
    names = _names_by_id
    if not names:
        # Built once per build, when every document has been read. Only objects with an
        # identity of their own: not numbers or strings, which may be shared.
        for name in list(py.objects):
            obj = _lookup(name)
            if callable(obj) or isinstance(obj, property):
                names.setdefault(id(getattr(obj, "__func__", obj)), name)
    for candidate in candidates:
        obj = _lookup(candidate)
        name = names.get(id(getattr(obj, "__func__", obj))) if obj is not None else None
        if name is not None:
            break
    else:
        return None
    return py.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], name, node, contnode)


def setup(app: Any) -> None:
    app.connect("autodoc-process-signature", _clean_signature)
    app.connect("env-check-consistency", _check_api_reference)
    app.connect("missing-reference", _resolve_by_identity)
