"""What the benchmark scripts print: target verdicts, aligned tables, versions, progress."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import metadata

__all__ = ["Target", "fmt", "progress", "table", "versions"]


@dataclass
class Target:
    """One goal from an issue and the figure this run measured for it."""

    name: str
    value: float | None
    threshold: float
    higher_is_better: bool
    unit: str = "x"
    detail: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "SKIP"
        ok = self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold
        return "PASS" if ok else "FAIL"


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def table(headers: list[str], rows: list[list[str]], names: int = 1) -> str:
    """The first `names` columns and the last (a note) are left-aligned, numbers right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            left = i < names or i == len(cells) - 1
            out.append(cell.ljust(width) if left else cell.rjust(width))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stderr: stdout stays clean for --json


def versions(dists: str) -> str:
    """`name version` of each space-separated distribution, or `name not installed`."""
    found = []
    for dist in dists.split():
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist} not installed")
    return ", ".join(found)
