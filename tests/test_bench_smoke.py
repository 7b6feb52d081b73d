"""The benchmark scripts keep working (run tiny; their figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `bench/<script>` with `args` in a fresh interpreter; it must exit 0."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert 0 == result.returncode, result.stderr[-2000:]
    return result


def test_sse_decode_benchmark_runs_quick() -> None:
    """`bench/sse_decode.py --quick` measures every contender and prints the target lines."""
    result = run_bench("sse_decode.py", "--quick", timeout=120)
    assert "== Targets ==" in result.stdout
    assert "(c) chat layer" in result.stdout
    assert "error" not in result.stdout.lower()


def test_soak_runs_quick_and_passes() -> None:
    """`bench/soak.py --quick`: resume is byte-identical and raise is exact, on a small run."""
    result = run_bench("soak.py", "--quick", "--json", timeout=120)
    assert "PASS" in result.stderr


def test_client_benchmark_runs_quick() -> None:
    """`bench/client.py --quick`: every contender streams, over the upstream in a child
    process (`holysheep.testing.UpstreamProcess`), and every target gets a verdict."""
    result = run_bench("client.py", "--quick", "--json", timeout=180)
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
    # The collector's share is measured (`gc_s`), within the CPU it is a share of.
    assert all(0 <= row["gc_s"] <= row["cpu_s"] for row in report["concurrency"])
    assert {"PASS", "FAIL"} >= {target["verdict"] for target in report["targets"]}
