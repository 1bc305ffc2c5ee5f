"""The README's runnable examples are executed, so they cannot rot."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _marked_examples():
    text = README.read_text()
    return re.findall(r"<!-- readme-test -->\s*```python\n(.*?)```", text, flags=re.S)


def test_readme_has_a_tested_example():
    assert _marked_examples(), "README lost its <!-- readme-test --> example"


def test_readme_examples_run():
    for source in _marked_examples():
        exec(compile(source, str(README), "exec"), {"__name__": "readme_example"})
