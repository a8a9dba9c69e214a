"""The examples in the README, in docstrings and in the plugin guide run as they are written."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

import relayer.testing

ROOT = Path(__file__).resolve().parent.parent


def run_test_example(source: str, tmp_path: Path) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(source, "<example>", "exec"), namespace)
    tests = [v for k, v in namespace.items() if k.startswith("test_") and callable(v)]
    assert len(tests) == 1
    tests[0](tmp_path)


def test_readme_testing_example_passes(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    examples = [b for b in blocks if "build_scheduler" in b]
    assert examples, "the README's testing example is missing"
    run_test_example(examples[0], tmp_path)


def test_relayer_testing_docstring_example_passes(tmp_path: Path) -> None:
    doc = relayer.testing.__doc__ or ""
    example = textwrap.dedent(doc.split("A complete test::", 1)[1])
    assert "build_scheduler" in example
    run_test_example(example, tmp_path)


def _doc_examples(doc: Path) -> list[tuple[str, str]]:
    """The ``python`` blocks of a Markdown page that define tests, with their sections."""
    examples = []
    section = ""
    for match in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```$", doc.read_text(), re.M | re.S):
        heading, source = match.groups()
        if heading is not None:
            section = heading.strip()
            continue
        tree = ast.parse(source)
        if any(
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name.startswith("test_")
            for node in tree.body
        ):
            examples.append((section, source))
    return examples


PLUGINS = ROOT / "docs" / "plugins.md"
PLUGIN_EXAMPLES = _doc_examples(PLUGINS)


def test_the_plugin_guide_has_examples_for_each_extension_point() -> None:
    assert PLUGIN_EXAMPLES, "docs/plugins.md has no example that defines a test"
    sections = [section for section, _ in PLUGIN_EXAMPLES]
    for wanted in ("Wire formats", "Retry policies", "Observers", "Transports", "Stores"):
        assert wanted in sections, f"docs/plugins.md has no test example under {wanted!r}"


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(source, id=f"{section}-{i}")
        for i, (section, source) in enumerate(PLUGIN_EXAMPLES)
    ],
)
@pytest_twisted.ensureDeferred
async def test_plugin_guide_example_passes(source: str, tmp_path: Path) -> None:
    """Each example's tests pass: those on a fake clock, and those on the reactor."""
    namespace: dict[str, Any] = {"__name__": "plugins_example"}
    exec(compile(source, str(PLUGINS), "exec"), namespace)
    tests = [(k, v) for k, v in namespace.items() if k.startswith("test_") and callable(v)]
    assert tests
    for name, test in tests:
        path = tmp_path / name
        path.mkdir()
        if inspect.iscoroutinefunction(test):
            await test(path)
        else:
            test(path)
