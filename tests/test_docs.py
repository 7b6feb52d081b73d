"""Every Python example in docs/ runs, as written; the docs name only errors that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def examples() -> list[tuple[str, str]]:
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for number, match in enumerate(BLOCK.finditer(page.read_text()), start=1):
            found.append((f"{page.name}#{number}", match.group(1)))
    return found


@pytest.mark.parametrize(("where", "code"), examples(), ids=[name for name, _ in examples()])
def test_doc_example_runs(where: str, code: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example executes without error; its own asserts check what it shows."""
    monkeypatch.chdir(DOCS.parent)
    exec(compile(code, where, "exec"), {"__name__": "__doc_example__"})


def test_the_migration_guide_names_only_errors_that_exist() -> None:
    """docs/from-openai.md said "`OpenAIError` and `APIError` are both `HolySheepError`", and
    holysheep has neither name: every error class it names is ours, a builtin, or marked as
    openai's ("openai's `APIError`", "its `APIError`")."""
    import builtins

    import holysheep

    text = (DOCS / "from-openai.md").read_text()
    named = re.findall(r"(openai's |its )?`(\w+Error)`", text)
    missing = {
        name
        for marked, name in named
        if not marked and not hasattr(holysheep, name) and not hasattr(builtins, name)
    }
    assert set() == missing
    assert "HolySheepError" in {name for _, name in named}
