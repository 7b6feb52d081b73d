"""The `holysheep` command, driven as a user drives it: a subprocess, its output, its exit code."""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

import holysheep
from holysheep.testing import UpstreamConfig, serve

CLI = [sys.executable, "-m", "holysheep"]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any holysheep settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLYSHEEP_")}
    return {**env, **extra}


def run(
    *args: str, env: Mapping[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_env() if env is None else dict(env),
        timeout=60,
    )


def expected_text(max_tokens: int) -> str:
    """What the embedded upstream streams for `max_tokens` (its tokens are deterministic)."""
    return "".join(UpstreamConfig().token_list(max_tokens))


def read_until(stream: int, predicate: Callable[[bytes], bool], timeout: float) -> bytes:
    """Read a pipe until `predicate(data_so_far)` holds; fail after `timeout` seconds."""
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while not predicate(data):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise AssertionError(f"timed out; read so far: {data!r}")
            piece = os.read(stream, 65536)
            if not piece:
                raise AssertionError(f"pipe closed; read so far: {data!r}")
            data += piece
    return data


@pytest.fixture
def fast_upstream() -> Iterator[holysheep.testing.MockUpstream]:
    with serve(tokens_per_s=2000) as upstream:
        yield upstream


# -- chat --------------------------------------------------------------------------------------


def test_chat_mock_streams_the_answer_and_prints_stats() -> None:
    """`chat --mock` needs no key: the answer goes to stdout, one stats line to stderr."""
    result = run("chat", "--mock", "hi", "--max-tokens", "12")

    assert 0 == result.returncode, result.stderr
    assert expected_text(12) + "\n" == result.stdout
    stats = r"ttft \d+ ms \| [\d.]+ tokens/s \| 12 tokens \| \$0\.\d{6} \| finish length"
    assert re.fullmatch(stats + "\n", result.stderr), result.stderr
    ttft_ms = int(re.search(r"ttft (\d+) ms", result.stderr).group(1))  # type: ignore[union-attr]
    assert 250 <= ttft_ms < 2000  # the embedded upstream waits ~0.3 s, like a real gateway


def test_chat_reads_the_prompt_from_stdin(fast_upstream: holysheep.testing.MockUpstream) -> None:
    """`-` reads the prompt from stdin; --system, --temperature and --model reach the server."""
    result = run(
        "chat",
        "-",
        "--base-url",
        fast_upstream.base_url,
        "--system",
        "Be brief.",
        "--temperature",
        "0.2",
        "--model",
        "deepseek-v3.2",
        env=clean_env(HOLYSHEEP_API_KEY="sk-test"),
        stdin="Tell me about sheep.\n",
    )

    assert 0 == result.returncode, result.stderr
    body = fast_upstream.requests[-1].body
    expected_messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about sheep.\n"},
    ]
    assert expected_messages == body["messages"]
    assert (0.2, "deepseek-v3.2") == (body["temperature"], body["model"])
    assert "Bearer sk-test" == fast_upstream.requests[-1].headers["authorization"]
    assert result.stdout.startswith("Sheep are gentle")


def test_chat_json_prints_one_object() -> None:
    """--json prints nothing while streaming, then one parseable object with everything."""
    result = run("chat", "--mock", "hi", "--max-tokens", "5", "--json")

    assert 0 == result.returncode, result.stderr
    assert "" == result.stderr
    report = json.loads(result.stdout)
    assert expected_text(5) == report["text"]
    assert ("gpt-4.1", "length", False) == (
        report["model"],
        report["finish_reason"],
        report["interrupted"],
    )
    assert 5 == report["usage"]["completion_tokens"] == report["stats"]["tokens"]
    assert report["stats"]["ttft_s"] > 0.25
    usage = report["usage"]
    expected_usd = (usage["prompt_tokens"] + usage["completion_tokens"]) * 8 / 1e6
    assert {"usd": pytest.approx(expected_usd), "estimated": False} == report["cost"]
    assert report["error"] is None


def chat_json_against(fault: str) -> subprocess.CompletedProcess[str]:
    """`holysheep chat hi --json` against the embedded upstream injecting `fault`."""
    with serve(fault=fault, tokens_per_s=2000) as upstream:
        return run(
            "chat", "hi", "--json", "--base-url", upstream.base_url,
            env=clean_env(HOLYSHEEP_API_KEY="k"),
        )  # fmt: skip


def test_chat_json_keeps_the_partial_answer_when_the_stream_fails() -> None:
    """--json prints nothing while streaming, so on an error mid-answer the object is where the
    text that did arrive goes: printed with the error, and the error line still on stderr."""
    result = chat_json_against("inband_error@3")

    assert 1 == result.returncode
    report = json.loads(result.stdout)
    assert expected_text(3) == report["text"]
    error = report["error"]
    assert ("StreamError", 200) == (error["type"], error["status"])
    assert "overloaded" in error["message"]
    assert error["request_id"] == report["stats"]["request_id"]
    assert report["cost"]["estimated"]  # text arrived, without usage: an estimate
    (line,) = result.stderr.splitlines()
    assert line.startswith("holysheep: error: the server reported an error in the stream")


def test_chat_json_reports_an_error_status_without_a_cost() -> None:
    """An error status: the object says which, with no text and no cost (nothing was billed)."""
    result = chat_json_against("status=401")

    assert 1 == result.returncode
    report = json.loads(result.stdout)
    assert ("", None) == (report["text"], report["cost"])
    assert ("AuthenticationError", 401) == (report["error"]["type"], report["error"]["status"])
    assert "mock fault: HTTP 401" in report["error"]["message"]
    assert 1 == len(result.stderr.splitlines())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan", "expected a number from 0 to 2, got nan"),
        ("inf", "expected a number from 0 to 2, got inf"),
        ("-5", "expected a number from 0 to 2, got -5"),
        ("2.5", "expected a number from 0 to 2, got 2.5"),
        ("warm", "expected a number, got 'warm'"),
    ],
)
def test_chat_temperature_is_a_number_from_0_to_2(value: str, message: str) -> None:
    """A usage error before any request (nan, inf and -5 were sent as they were)."""
    result = run("chat", "--mock", "hi", f"--temperature={value}")

    assert (2, "") == (result.returncode, result.stdout)
    assert (
        f"holysheep chat: error: argument --temperature: {message}"
        == (result.stderr.splitlines()[-1])
    )


def run_closed(closed: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The command with stdout (`>&-`) or stderr (`2>&-`) closed, as a shell can start it."""
    command = " ".join([*CLI, *args])  # nothing in CLI or args needs quoting
    return subprocess.run(
        ["sh", "-c", f"exec {command} {closed}"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )


def test_chat_with_stdout_closed_says_so_without_asking() -> None:
    """It said "AttributeError: 'NoneType' object has no attribute 'write'" (after paying
    for the request); now one error line, before any request."""
    result = run_closed(">&-", "chat", "--mock", "hi", "--max-tokens", "3")

    assert (1, "") == (result.returncode, result.stdout)
    assert ["holysheep: error: stdout is closed: there is nowhere to write the answer"] == (
        result.stderr.splitlines()
    )


def test_chat_with_stderr_closed_keeps_stdout_for_the_answer() -> None:
    """The stats line went to stdout (print(file=None) writes there); now nowhere."""
    result = run_closed("2>&-", "chat", "--mock", "hi", "--max-tokens", "3")

    assert (0, expected_text(3) + "\n", "") == (result.returncode, result.stdout, result.stderr)


@pytest.mark.parametrize("levels", ["", ",", " , "])
def test_bench_without_concurrency_levels_is_a_usage_error(levels: str) -> None:
    """It ran a ramp of no levels and exited 0."""
    result = run("bench", f"--concurrency={levels}")

    assert (2, "") == (result.returncode, result.stdout)
    assert (
        f"holysheep bench: error: argument --concurrency: expected levels such as 10,100,1000,"
        f" got {levels!r}"
    ) == result.stderr.splitlines()[-1]


def test_bench_refuses_a_concurrency_level_given_twice() -> None:
    """`5,5` merged both runs into one row: "10/5 ok, 200.0%"."""
    result = run("bench", "--concurrency=5,5")

    assert (2, "") == (result.returncode, result.stdout)
    assert result.stderr.splitlines()[-1].endswith("each level once, please: got '5,5'")


def test_bench_faults_fire_inside_an_answer_shorter_than_max_tokens() -> None:
    """The mock answers 97 tokens; with --max-tokens 200 half the faults were placed past the
    end, never fired, and their streams counted as recovered from a fault."""
    result = run(
        "bench",
        "--json",
        "--requests",
        "6",
        "--concurrency",
        "1",
        "--faults",
        "--max-tokens",
        "200",
    )

    assert 0 == result.returncode, result.stderr
    faults = json.loads(result.stdout)["faults"]
    assert (6, 6) == (faults["streams"], faults["byte_identical"])
    assert faults["attempts_per_recovered_stream"] >= 2  # every stream needed a retry


def test_missing_api_key_is_one_line_naming_the_variable() -> None:
    """Without a key the command says which variable to set, with no traceback."""
    result = run("chat", "hi")

    assert 1 == result.returncode
    assert "" == result.stdout
    assert [
        "holysheep: error: no API key: set the HOLYSHEEP_API_KEY environment variable"
        " (or try --mock, which needs none)"
    ] == result.stderr.splitlines()
    bench = run("bench", "--base-url", "http://127.0.0.1:9/v1")
    assert 1 == bench.returncode
    assert [
        "holysheep: error: no API key for --base-url: set the HOLYSHEEP_API_KEY environment"
        " variable (without --base-url the bench runs against the embedded upstream, which needs"
        " none)"
    ] == bench.stderr.splitlines()


def test_http_error_is_one_line() -> None:
    """An error status prints the library's message on one line and exits 1."""
    with serve(fault="status=401") as upstream:
        result = run(
            "chat", "hi", "--base-url", upstream.base_url, env=clean_env(HOLYSHEEP_API_KEY="bad")
        )

    assert 1 == result.returncode
    (line,) = result.stderr.splitlines()
    assert line.startswith("holysheep: error: ")
    assert "401" in line
    assert "mock fault: HTTP 401" in line
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback() -> None:
    """--debug is for bug reports: the traceback comes with the error line."""
    with serve(fault="status=401") as upstream:
        result = run(
            "chat",
            "hi",
            "--debug",
            "--base-url",
            upstream.base_url,
            env=clean_env(HOLYSHEEP_API_KEY="bad"),
        )

    assert 1 == result.returncode
    assert "Traceback (most recent call last)" in result.stderr
    assert "AuthenticationError" in result.stderr


def test_ctrl_c_closes_the_stream_and_keeps_the_partial_text() -> None:
    """SIGINT mid-stream: exit 130, what was printed stays, and the server sees us leave."""
    with serve(tokens_per_s=40, tokens=2000) as upstream:
        process = subprocess.Popen(
            [*CLI, "chat", "hi", "--base-url", upstream.base_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=clean_env(HOLYSHEEP_API_KEY="k"),
        )
        try:
            assert process.stdout is not None
            partial = read_until(process.stdout.fileno(), lambda data: len(data) >= 20, 10)
            process.send_signal(signal.SIGINT)
            rest, err = process.communicate(timeout=10)
        finally:
            process.kill()
        assert upstream.wait_for_disconnect(timeout=5)

    assert 130 == process.returncode
    printed = (partial + rest).decode()
    full = "".join(UpstreamConfig(tokens=2000).token_list(None))
    assert full.startswith(printed)  # exactly what arrived: no newline added, nothing lost
    assert len(printed) < len(full)
    lines = err.decode().splitlines()
    assert re.fullmatch(r"holysheep: interrupted after \d+ tokens; stream closed", lines[-1])
    assert "Traceback" not in err.decode()


def test_usage_errors_exit_2() -> None:
    """Wrong arguments are argparse-style usage errors with status 2."""
    assert 2 == run("chat").returncode
    assert 2 == run("chat", "hi", "--mock", "--base-url", "http://127.0.0.1:9/v1").returncode
    assert 2 == run("chat", "hi", "--max-tokens", "0").returncode
    empty = run("chat", "-", "--mock", stdin="  \n")
    assert 2 == empty.returncode
    assert "the prompt is empty" in empty.stderr
    faults = run("bench", "--faults", "--base-url", "http://127.0.0.1:9/v1")
    assert 2 == faults.returncode
    assert "--faults" in faults.stderr.splitlines()[-1]
    plot = run("bench", "--plot", "out.txt")
    assert 2 == plot.returncode
    assert "--plot out.txt: the file name must end in .png, .svg, .pdf" in plot.stderr
    assert 2 == run("bench", "--concurrency", "10,0").returncode


def test_help_and_version() -> None:
    """--help lists the four commands; --version prints the package version."""
    result = run("--help")
    assert 0 == result.returncode
    for command in ("chat", "mock", "cost", "bench"):
        assert command in result.stdout
    assert f"holysheep {holysheep.__version__}\n" == run("--version").stdout


# -- mock --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_mock_prints_its_url_serves_and_stops(stop: signal.Signals) -> None:
    """`holysheep mock` prints the base URL first, serves the API, and exits 0 when stopped."""
    process = subprocess.Popen(
        [*CLI, "mock", "--tokens", "4", "--event-ids"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert process.stdout is not None
        first = read_until(process.stdout.fileno(), lambda data: b"\n" in data, 10)
        # The first line announces the base URL (its wording belongs to holysheep.testing).
        match = re.search(rb"(http://127\.0\.0\.1:\d+/v1)\s*$", first.splitlines()[0])
        assert match, first
        with holysheep.Client(api_key="k", base_url=match.group(1).decode()) as client:
            completion = client.chat.complete(model="gpt-4.1", messages=[])
        process.send_signal(stop)
        _, err = process.communicate(timeout=10)
    finally:
        process.kill()

    assert "".join(UpstreamConfig(tokens=4).token_list(None)) == completion.text
    assert 0 == process.returncode
    assert b"stopped" in err


def test_mock_errors_are_one_line_without_a_traceback() -> None:
    """A bad port or fault is a usage error (2) whose last line says what is wrong, the
    fault's with the valid kinds; a busy port is one error line (1)."""
    bad_port = run("mock", "--port", "99999")
    bad_fault = run("mock", "--fault", "bogus")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run("mock", "--port", str(port))

    assert (2, "holysheep mock: error: argument --port: 99999 is not a TCP port") == (
        bad_port.returncode,
        bad_port.stderr.splitlines()[-1].partition(" (")[0],
    )
    assert (2, "holysheep mock: error: argument --fault: unknown fault 'bogus'") == (
        bad_fault.returncode,
        bad_fault.stderr.splitlines()[-1].partition(";")[0],
    )
    assert "expected one of drop, stall, status," in bad_fault.stderr
    assert 1 == busy.returncode
    assert [f"holysheep mock: error: cannot listen on 127.0.0.1:{port}"] == [
        line.rpartition(": ")[0] for line in busy.stderr.splitlines()
    ]
    assert "Traceback" not in bad_port.stderr + bad_fault.stderr + busy.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ttft", "-1"], "argument --ttft: must be 0 or more, not -1"),
        (["--tokens-per-s", "0"], "argument --tokens-per-s: must be more than 0, not 0"),
        (["--keepalive", "0"], "argument --keepalive: must be more than 0, not 0"),
        (["--ttft", "nan"], "argument --ttft: expected a finite number, not nan"),
        # argparse named the converter ("invalid _port value", "invalid _count value"), and a
        # fault's number was "invalid literal for int() with base 10: 'x'".
        (["--port", "abc"], "argument --port: expected a TCP port number, not 'abc'"),
        (["--tokens", "1.5"], "argument --tokens: expected a whole number, not '1.5'"),
        (
            ["--fault", "drop@x"],
            "argument --fault: fault 'drop@x': the count after @ must be a whole number, got 'x'"
            " (as in drop@5)",
        ),
        (
            ["--fault", "status=abc"],
            "argument --fault: fault 'status=abc': the status must be a whole number, got 'abc'"
            " (as in status=429)",
        ),
        (
            ["--tokens", "99999999999999999999"],
            "argument --tokens: must be from 0 to 1,000,000, not 99999999999999999999",
        ),
    ],
)
def test_mock_times_and_rates_out_of_range_are_usage_errors(args: list[str], message: str) -> None:
    """They printed a 25-line traceback and exited 1, where the docs promise one line and 2."""
    result = run("mock", *args)
    assert (2, f"holysheep mock: error: {message}") == (
        result.returncode,
        result.stderr.splitlines()[-1],
    )


# -- cost --------------------------------------------------------------------------------------


def test_cost_table_for_500m_tokens_of_gpt_4_1() -> None:
    """500M tokens of gpt-4.1: $4,000 through the gateway against $30,000 direct."""
    result = run("cost", "--tokens-per-month", "500M", "--model", "gpt-4.1")

    assert 0 == result.returncode, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        words = line.split()
        if words[:1] in (["OpenAI"], ["HolySheep"]):
            rows[" ".join(words[:3])] = line  # "HolySheep gateway gpt-4.1": the whole row
    assert "$30,000.00" in rows["OpenAI direct gpt-4.1"]
    assert "(baseline)" in rows["OpenAI direct gpt-4.1"]
    assert "$4,000.00" in rows["HolySheep gateway gpt-4.1"]
    assert "$26,000.00 (86.7%)" in rows["HolySheep gateway gpt-4.1"]
    assert "$210.00" in rows["HolySheep gateway deepseek-v3.2"]
    assert "$312,000.00/year" in result.stdout


def test_cost_json_and_suffixes() -> None:
    """--json gives the same numbers to scripts; 0.5B is 500M."""
    result = run("cost", "--tokens-per-month", "0.5B", "--json")

    assert 0 == result.returncode, result.stderr
    report = json.loads(result.stdout)
    assert 500_000_000 == report["tokens_per_month"]
    by_route = {(row["route"], row["model"]): row for row in report["rows"]}
    assert 30_000 == by_route["direct", "gpt-4.1"]["monthly_usd"]
    assert 4_000 == by_route["gateway", "gpt-4.1"]["monthly_usd"]
    assert 26_000 == by_route["gateway", "gpt-4.1"]["savings_usd"]


def test_cost_reads_prices_from_holysheep_prices(tmp_path: Path) -> None:
    """HOLYSHEEP_PRICES points at a TOML file whose prices replace the built-in ones."""
    prices = tmp_path / "prices.toml"
    prices.write_text('[gateway]\n"gpt-4.1" = { input = 2.0, output = 6.0 }\n')
    result = run(
        "cost",
        "--tokens-per-month",
        "1M",
        "--output-share",
        "0.25",
        env=clean_env(HOLYSHEEP_PRICES=str(prices)),
    )

    assert 0 == result.returncode, result.stderr
    assert str(prices) in result.stdout
    assert "2.00 in / 6.00 out" in result.stdout
    assert "$3.00" in result.stdout  # 0.75M x $2 + 0.25M x $6


def test_cost_of_a_gateway_dearer_than_direct_says_it_costs_more(tmp_path: Path) -> None:
    """A negative saving printed "$-3.00 (-60.0%)" and "saves $-3.00/month"."""
    prices = tmp_path / "prices.toml"
    prices.write_text('[gateway]\n"gpt-4.1" = 8.0\n[direct]\n"gpt-4.1" = 5.0\n')
    result = run("cost", "--tokens-per-month", "1M", env=clean_env(HOLYSHEEP_PRICES=str(prices)))

    assert 0 == result.returncode, result.stderr
    row = next(line for line in result.stdout.splitlines() if "gpt-4.1 *" in line)
    assert row.endswith("  $8.00    -$3.00 (-60.0%)")
    assert result.stdout.endswith(
        "direct: costs $3.00/month more (60.0% more), $36.00/year more.\n"
    )


def test_cost_unknown_model_lists_the_known_ones() -> None:
    """A model without a price is a usage error that says which models have one."""
    result = run("cost", "--tokens-per-month", "1M", "--model", "gpt-5")

    assert 2 == result.returncode
    assert "no gateway price for model 'gpt-5'" in result.stderr
    assert "deepseek-v3.2" in result.stderr


@pytest.mark.parametrize(
    ("volume", "message"),
    [("1,5M", "1.5M, not 1,5M), got '1,5M'"), ("0.4", "less than one token")],
)
def test_cost_refuses_a_decimal_comma_and_less_than_a_token(volume: str, message: str) -> None:
    """A usage error: "1,5M" printed a table for 15M tokens, and "0.4" one for 0 tokens."""
    result = run("cost", "--tokens-per-month", volume)

    assert (2, "", True) == (result.returncode, result.stdout, message in result.stderr)
    assert "argument --tokens-per-month: " in result.stderr.splitlines()[-1]


def test_cost_does_not_load_the_network_stack() -> None:
    """`holysheep cost` is arithmetic: it starts without requests, httpx or anyio."""
    code = (
        "import sys; from holysheep._cli import main; "
        "main(['cost', '--tokens-per-month', '1M']); "
        "print(sorted({'requests', 'httpx', 'anyio', 'socket'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=clean_env()
    )
    assert "[]" == result.stdout.splitlines()[-1]


# -- bench -------------------------------------------------------------------------------------


def test_bench_json_and_plot(tmp_path: Path) -> None:
    """A small bench against the embedded upstream: JSON on stdout, progress on stderr, a PNG."""
    plot = tmp_path / "bench.png"
    result = run(
        "bench",
        "--json",
        "--requests",
        "2",
        "--max-tokens",
        "3",
        "--concurrency",
        "2,20",
        "--faults",
        "--plot",
        str(plot),
    )

    assert 0 == result.returncode, result.stderr
    report = json.loads(result.stdout)  # stdout is the JSON object and nothing else
    assert {
        "target",
        "base_url",
        "model",
        "sequential",
        "concurrency",
        "faults",
        "environment",
    } <= set(report)
    assert (None, "gpt-4.1", str(plot)) == (report["base_url"], report["model"], report["plot"])
    sequential = report["sequential"]
    assert (2, 2, {}) == (sequential["requests"], sequential["ok"], sequential["errors"])
    assert 0.25 < sequential["ttft_s"]["p50"] < 2  # the upstream waits 0.3 s
    assert 20 < sequential["tokens_per_s"]["p50"] < 80  # ... and sends 50 tokens/s

    levels = report["concurrency"]
    assert [2, 20] == [level["streams"] for level in levels]
    for level in levels:
        streams = level["streams"]
        assert (streams, 1.0, {}) == (level["ok"], level["success_rate"], level["errors"])
        assert streams == level["max_open"]  # all were open before the first tokens left
        assert 10 * streams == level["events"]  # 10 tokens per stream, every one counted
        assert 2 <= level["release_after_s"] < 2.1
        assert level["all_open_after_s"] < level["release_after_s"]
        # From the release: what the client adds, milliseconds on an idle machine.
        assert "release" == level["ttft_from"]
        assert 0 <= level["ttft_s"]["minimum"] <= level["ttft_s"]["p50"] <= level["ttft_s"]["p99"]
        assert level["ttft_s"]["p99"] < 2
        assert 5 < level["tokens_per_s"]["p50"] < 60  # the upstream sends 50 tokens/s
        assert 0 < level["cpu_per_event_us"] < 100_000
        assert level["rss_per_stream_kib"] is None or 0 <= level["rss_per_stream_kib"] < 10_000
        assert level["rss_base_mib"] > 10  # an interpreter with httpx loaded
        assert level["server_cpu_s"] is None or level["server_cpu_s"] >= 0
    assert report["transport"].startswith("AsyncHTTPXTransport")

    faults = report["faults"]
    assert (2, 2, 1.0) == (faults["streams"], faults["byte_identical"], faults["success_rate"])
    assert faults["attempts_per_recovered_stream"] > 1  # every stream really was faulted

    # Not a terminal: one plain progress line per phase on stderr, and where the plot went.
    progress = result.stderr.splitlines()
    assert re.fullmatch(
        r"holysheep bench: embedded upstream at http://127\.0\.0\.1:\d+/v1 \(pid \d+\)", progress[0]
    )
    assert [
        "holysheep bench: sequential: 2 streams, one at a time",
        "holysheep bench: 2 concurrent streams (first tokens released at 2.00 s)",
        "holysheep bench: 20 concurrent streams (first tokens released at 2.02 s)",
        "holysheep bench: faults: 2 streams, one fault each",
        f"holysheep bench: plot written to {plot}",
    ] == progress[1:]

    png = plot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 20_000  # two panels of lines and text, not an empty canvas
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1320, 528)  # 12 x 4.8 inches at 110 dpi


def test_bench_table_stops_the_upstream_it_started() -> None:
    """The table goes to stdout; the upstream child process is gone when the command ends."""
    pytest.importorskip("aiohttp")
    result = run(
        "bench",
        "--requests",
        "1",
        "--max-tokens",
        "2",
        "--concurrency",
        "3",
        "--transport",
        "aiohttp",
    )

    assert 0 == result.returncode, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("holysheep bench: gpt-4.1 against embedded upstream")
    assert "ramp client: AsyncClient on AiohttpTransport" == lines[1]
    assert re.search(r"^ttft +1/1 +\d+ ms", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^ +3 +3/3 +100\.0% +3 +\d+ ms +\d+ ms", result.stdout, re.MULTILINE)
    port = int(re.search(r"127\.0\.0\.1:(\d+)", result.stderr).group(1))  # type: ignore[union-attr]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_bench_ctrl_c_stops_the_upstream_and_exits_130() -> None:
    """SIGINT in the middle of the ramp: exit 130, one line, and the upstream child is gone."""
    process = subprocess.Popen(
        [*CLI, "bench", "--requests", "1", "--concurrency", "50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    try:
        assert process.stderr is not None
        seen = read_until(process.stderr.fileno(), lambda data: b"concurrent streams" in data, 30)
        time.sleep(0.5)  # the 50 streams are open, waiting for their first token
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()

    assert 130 == process.returncode
    assert b"" == out
    assert [b"holysheep: interrupted"] == err.strip().splitlines()[-1:]
    assert b"Traceback" not in err
    port = int(re.search(rb"127\.0\.0\.1:(\d+)", seen).group(1))  # type: ignore[union-attr]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize(
    ("module", "option", "extra"),
    [("matplotlib", "--plot", "plot"), ("aiohttp", "--transport", "aiohttp")],
)
def test_bench_missing_extra_is_one_line(
    module: str, option: str, extra: str, tmp_path: Path
) -> None:
    """--plot without matplotlib (or --transport aiohttp without aiohttp) names the pip command."""
    blocked = (
        f"import sys; sys.modules[{module!r}] = None; "  # what `import {module}` sees if absent
        "from holysheep._cli import main; sys.exit(main(sys.argv[1:]))"
    )
    value = str(tmp_path / "out.png") if option == "--plot" else "aiohttp"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", blocked, "bench", option, value],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
    )

    assert 1 == result.returncode
    assert "" == result.stdout
    assert [
        f"holysheep: error: {option} {'aiohttp ' if option == '--transport' else ''}needs"
        f" {module}, which is not installed: pip install 'holysheep[{extra}]'"
    ] == result.stderr.splitlines()
    assert time.monotonic() - started < 10  # refused before measuring anything
    assert not (tmp_path / "out.png").exists()
