"""The examples in the README and in docstrings run as they are written."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

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
