"""The benchmark scripts keep working (run tiny; their figures are not checked here)."""

from __future__ import annotations

import json
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


def test_client_benchmark_runs_quick() -> None:
    """`bench/client.py --quick`: every contender streams, over the upstream in a child
    process (`holysheep.testing.UpstreamProcess`), and every target gets a verdict."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "client.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert 0 == result.returncode, result.stderr[-2000:]
    report = json.loads(result.stdout)
    for section in ("throughput", "ttft", "concurrency"):
        rows = report[section]
        assert rows
        for row in rows:
            assert "" == row["note"], (section, row)
    assert all(row["events_per_cpu_s"] > 0 for row in report["throughput"])
    assert all(
        0 == row["new_connections"] for row in report["ttft"] if "holysheep" in row["contender"]
    )
    assert all(row["ok"] == row["streams"] for row in report["concurrency"])
    assert {"PASS", "FAIL"} >= {target["verdict"] for target in report["targets"]}
