"""The benchmark scripts keep working (run tiny; their figures are not checked here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sse_decode_benchmark_runs_quick() -> None:
    """`bench/sse_decode.py --quick` measures every contender and prints the target lines."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sse_decode.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == result.returncode, result.stderr[-2000:]
    assert "== Targets ==" in result.stdout
    assert "(c) chat layer" in result.stdout
    assert "error" not in result.stdout.lower()


def test_soak_runs_quick_and_passes() -> None:
    """`bench/soak.py --quick`: resume is byte-identical and raise is exact, on a small run."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert 0 == result.returncode, result.stderr[-2000:]
    assert "PASS" in result.stderr
