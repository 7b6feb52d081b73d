"""Prices and costs: pure arithmetic over a pinned table, overridable by TOML."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from holysheep import Choice, Completion, ConfigurationError, ToolCall, _pricing
from holysheep._pricing import (
    PRICES_ENV,
    Price,
    PriceTable,
    cost_of,
    estimate_tokens,
    monthly_roi,
    normalize_model,
    parse_token_count,
    provider_of,
)


def test_default_prices() -> None:
    """The pinned gateway prices, and gpt-4.1 direct as the comparison."""
    table = PriceTable.default()
    assert Price(8.0, 8.0) == table.lookup("gpt-4.1")
    assert Price(15.0, 15.0) == table.lookup("claude-sonnet-4.5")
    assert Price(2.5, 2.5) == table.lookup("gemini-2.5-flash")
    assert Price(0.42, 0.42) == table.lookup("deepseek-v3.2")
    assert Price(60.0, 60.0) == table.lookup_direct("gpt-4.1")
    assert table.lookup_direct("deepseek-v3.2") is None


@pytest.mark.parametrize(
    "name", ["gpt-4.1", "GPT-4.1", "openai/gpt-4.1", " gpt-4.1 ", "gpt-4.1-2025-04-14"]
)
def test_lookup_is_tolerant_of_how_models_are_written(name: str) -> None:
    """Case, provider prefixes and snapshot dates do not change the price."""
    assert Price.blended(8.0) == PriceTable.default().lookup(name)


@pytest.mark.parametrize(
    "name",
    [
        "claude-sonnet-4-5",
        "claude-sonnet-4-5-20250929",
        "anthropic/claude-sonnet-4-5",
        "claude-sonnet-4.5",
    ],
)
def test_anthropics_own_model_ids_are_priced(name: str) -> None:
    """Anthropic writes the version with a dash (`claude-sonnet-4-5`), gateways with a dot:
    a completion reporting Anthropic's id had no price, so no cost at all."""
    assert Price.blended(15.0) == PriceTable.default().lookup(name)


@pytest.mark.parametrize("name", ["gpt-4.1-mini", "gpt-4", "unknown", ""])
def test_lookup_never_matches_by_prefix(name: str) -> None:
    """gpt-4.1-mini is another model: unknown, not priced as gpt-4.1."""
    assert PriceTable.default().lookup(name) is None


def test_normalize_and_provider() -> None:
    """Keys drop prefixes and dates and write versions with a dot; direct routes are labelled
    by provider."""
    assert "claude-sonnet-4.5" == normalize_model("anthropic/claude-sonnet-4-5-20250929")
    assert "gpt-4-0613" == normalize_model("gpt-4-0613")  # a snapshot number, not a version
    assert ["OpenAI", "Anthropic", "Google", "DeepSeek", "direct"] == [
        provider_of(m)
        for m in ("gpt-4.1", "claude-sonnet-4.5", "gemini-2.5-flash", "deepseek-v3.2", "x")
    ]


def test_cost_of_with_usage_is_exact() -> None:
    """Reported usage gives an exact cost: tokens x price per million."""
    cost = cost_of(1_000, 500, "gpt-4.1")
    assert cost is not None
    assert pytest.approx(0.012) == cost.usd
    assert not cost.estimated


def test_cost_of_separates_input_and_output() -> None:
    """Split prices charge prompt and completion tokens apart."""
    table = PriceTable(gateway={"m": Price(2.0, 8.0)})
    cost = cost_of(1_000, 500, "m", table)
    assert cost is not None
    assert pytest.approx(0.002 + 0.004) == cost.usd


def test_cost_of_without_usage_is_estimated() -> None:
    """No usage from the server: counts come from the text, and the cost says so."""
    cost = cost_of(None, None, "gpt-4.1", prompt_text="x" * 40, completion_text="y" * 400)
    assert cost is not None
    assert pytest.approx((10 + 100) * 8 / 1e6) == cost.usd  # 10 + 100 estimated tokens
    assert cost.estimated
    partial = cost_of(10, None, "gpt-4.1", completion_text="abcd")
    assert partial is not None
    assert partial.estimated


def test_cost_of_unknown_model_is_none() -> None:
    """No price, no cost: callers show "unknown" rather than $0."""
    assert cost_of(10, 10, "no-such-model") is None


@pytest.mark.parametrize(("text", "tokens"), [("", 0), ("a", 1), ("abcd", 1), ("abcde", 2)])
def test_estimate_tokens(text: str, tokens: int) -> None:
    """About four characters a token, rounded up."""
    assert tokens == estimate_tokens(text)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True])
def test_price_rejects_nonsense(bad: float) -> None:
    """Prices users construct are checked: finite and not negative."""
    with pytest.raises(ValueError, match="input_per_million"):
        Price(bad, 1.0)


def test_a_price_is_blended_when_input_and_output_cost_the_same() -> None:
    """`is_blended` tells a one-figure price (shown once) from a split one."""
    assert (True, True, False) == (
        Price.blended(8.0).is_blended,
        Price(2.0, 2.0).is_blended,
        Price(2.0, 8.0).is_blended,
    )


def test_from_toml_overrides_the_defaults(tmp_path: Path) -> None:
    """A file's models replace the built-in ones; the others stay; one side applies to both."""
    path = tmp_path / "prices.toml"
    path.write_text(
        "[gateway]\n"
        '"GPT-4.1" = 7\n'
        '"claude-sonnet-4.5" = { input = 3.0, output = 15.0 }\n'
        '"my-model" = { output = 1.5 }\n'
        "[direct]\n"
        '"gpt-4.1" = { input = 2.0, output = 8.0 }\n'
    )
    table = PriceTable.from_toml(path)

    assert Price(7.0, 7.0) == table.lookup("gpt-4.1")
    assert Price(3.0, 15.0) == table.lookup("claude-sonnet-4.5")
    assert Price(1.5, 1.5) == table.lookup("my-model")
    assert Price(0.42, 0.42) == table.lookup("deepseek-v3.2")
    assert Price(2.0, 8.0) == table.lookup_direct("gpt-4.1")
    assert str(path) == table.source


def test_from_toml_with_an_empty_base_uses_only_the_file(tmp_path: Path) -> None:
    """`base=PriceTable()` drops the built-in prices."""
    path = tmp_path / "prices.toml"
    path.write_text('[gateway]\n"a" = 1\n')
    table = PriceTable.from_toml(path, base=PriceTable())
    assert ({"a": Price(1.0, 1.0)}, {}) == (dict(table.gateway), dict(table.direct))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[gateway\n", "is not valid TOML"),
        ('[gateway]\n"a" = -1\n', "'a': input_per_million must be"),
        ('[gateway]\n"a" = "cheap"\n', "'a': expected a number"),
        ('[gateway]\n"a" = { in = 1 }\n', "'a': expected keys input and/or output"),
        ('[gateway]\n"a" = true\n', "'a': expected a number"),
        ('[gateway]\n"a" = { input = true }\n', "expected a number for input, got True"),
        ('[prices]\n"a" = 1\n', "unknown section(s) prices"),
        ("gateway = 3\n", "[gateway] must be a table"),
    ],
)
def test_from_toml_errors_name_the_file_and_the_entry(
    tmp_path: Path, content: str, message: str
) -> None:
    """A broken prices file fails with one ConfigurationError saying where and what."""
    path = tmp_path / "prices.toml"
    path.write_text(content)
    with pytest.raises(ConfigurationError) as info:
        PriceTable.from_toml(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_from_toml_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigurationError too, not an OSError from deep inside."""
    with pytest.raises(ConfigurationError, match="cannot read prices from"):
        PriceTable.from_toml(tmp_path / "nope.toml")


def test_from_toml_without_a_toml_reader_says_what_is_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Python 3.10 without `tomli` the file cannot be read: a ConfigurationError naming the
    file and the fix, not an ImportError from deep inside."""
    path = tmp_path / "prices.toml"
    path.write_text('[gateway]\n"a" = 1\n')
    monkeypatch.setattr(_pricing, "_toml_loads", None)
    with pytest.raises(ConfigurationError) as info:
        PriceTable.from_toml(path)
    assert f"cannot read {path}: reading TOML needs Python 3.11+ or `tomli`" == str(info.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[gateway]\n"a" = 1\n'.encode("utf-16"), "is UTF-16, and a TOML file must be UTF-8"),
        (b'[gateway]\n"caf\xe9" = 1\n', "is not UTF-8, as a TOML file must be: byte 0xe9"),
    ],
    ids=["utf-16", "latin-1"],
)
def test_a_prices_file_that_is_not_utf8_is_a_clear_error_naming_it_and_the_variable(
    tmp_path: Path, content: bytes, message: str
) -> None:
    """A UTF-16 file (PowerShell 5.1's default) escaped as a bare `UnicodeDecodeError`, which
    the CLI printed naming neither the file nor `HOLYSHEEP_PRICES`."""
    path = tmp_path / "prices.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigurationError) as info:
        PriceTable.from_environment({PRICES_ENV: str(path)})
    assert str(path) in str(info.value)
    assert message in str(info.value)
    assert str(info.value).endswith(f"(the prices file {PRICES_ENV} names)")


def test_a_prices_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Notepad's UTF-8 starts with a byte-order mark, which TOML parsers refuse as an
    "invalid statement" at line 1: it is dropped."""
    path = tmp_path / "prices.toml"
    path.write_bytes(b'\xef\xbb\xbf[gateway]\n"gpt-4.1" = 5\n')
    assert Price(5.0, 5.0) == PriceTable.from_toml(path).lookup("gpt-4.1")


def test_from_environment(tmp_path: Path) -> None:
    """HOLYSHEEP_PRICES names the override file; unset means the built-in table."""
    path = tmp_path / "prices.toml"
    path.write_text('[gateway]\n"gpt-4.1" = 5\n')
    assert PriceTable.default() == PriceTable.from_environment({})
    table = PriceTable.from_environment({PRICES_ENV: str(path)})
    assert Price(5.0, 5.0) == table.lookup("gpt-4.1")


def test_monthly_roi_for_500m_tokens_of_gpt_4_1() -> None:
    """Direct first as the baseline, then the gateway for the model, then alternatives."""
    rows = monthly_roi(500_000_000, "gpt-4.1", PriceTable.default())

    assert [("direct", "gpt-4.1"), ("gateway", "gpt-4.1")] == [(r.route, r.model) for r in rows[:2]]
    direct, gateway = rows[0], rows[1]
    assert (30_000.0, True, None) == (direct.monthly_usd, direct.baseline, direct.savings_usd)
    assert (4_000.0, True, 26_000.0) == (gateway.monthly_usd, gateway.selected, gateway.savings_usd)
    assert pytest.approx(26 / 30) == gateway.savings_ratio
    assert "OpenAI" == direct.provider
    others = [(r.model, r.monthly_usd) for r in rows[2:]]
    assert [
        ("claude-sonnet-4.5", 7_500.0),
        ("gemini-2.5-flash", 1_250.0),
        ("deepseek-v3.2", pytest.approx(210.0)),
    ] == others


def test_monthly_roi_without_a_direct_price() -> None:
    """No direct price: no baseline row and no savings, rather than invented ones."""
    rows = monthly_roi(1_000_000, "deepseek-v3.2")
    assert not any(row.baseline for row in rows)
    assert {None} == {row.savings_usd for row in rows}


def test_monthly_roi_splits_by_output_share() -> None:
    """The volume splits into prompt and completion by `output_share` for split prices."""
    table = PriceTable(gateway={"m": Price(1.0, 9.0)}, direct={"m": Price(10.0, 10.0)})
    (direct, gateway) = monthly_roi(1_000_000, "m", table, output_share=0.25)
    assert (10.0, 3.0, 7.0) == (direct.monthly_usd, gateway.monthly_usd, gateway.savings_usd)


def test_monthly_roi_rejects_unknown_models_and_bad_numbers() -> None:
    """An unknown model lists the known ones; negative volumes and shares are refused."""
    with pytest.raises(LookupError, match=r"'gpt-5' \(known: claude-sonnet-4.5, deepseek"):
        monthly_roi(1, "gpt-5")
    with pytest.raises(ValueError, match="tokens_per_month"):
        monthly_roi(-1, "gpt-4.1")
    with pytest.raises(ValueError, match="output_share"):
        monthly_roi(1, "gpt-4.1", output_share=1.5)


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("500M", 500_000_000),
        ("500m", 500_000_000),
        ("1.5B", 1_500_000_000),
        ("20000", 20_000),
        ("2K", 2_000),
        ("1_000", 1_000),
        ("1,000,000", 1_000_000),
        ("1,500.5K", 1_500_500),
        (" 3 M ", 3_000_000),
        ("0", 0),
    ],
)
def test_parse_token_count(text: str, count: int) -> None:
    """K, M and B suffixes, any case, with decimals and digit separators."""
    assert count == parse_token_count(text)


@pytest.mark.parametrize(
    "text",
    # A comma outside groups of three is a decimal comma (1,5M was read as 15M) or a typo.
    ["", "M", "5X", "-5M", "1e6", "five", "1,5M", "1,5", "10,00", "1000,000", ",000", "1,"],
)
def test_parse_token_count_rejects(text: str) -> None:
    """Anything else is a ValueError with an example of what works."""
    with pytest.raises(ValueError, match="such as 500M"):
        parse_token_count(text)


@pytest.mark.parametrize("text", ["0.4", "0.0004K"])
def test_parse_token_count_rejects_less_than_one_token(text: str) -> None:
    """An amount that rounds to no tokens is a mistake, not a month of 0 tokens."""
    with pytest.raises(ValueError, match=f"'{text}' is less than one token"):
        parse_token_count(text)


def test_pricing_is_pure() -> None:
    """The pricing module loads no clock-, socket- or HTTP-related module."""
    # What attrs loads is the baseline (on Python 3.10 it loads select, by way of platform).
    code = (
        "import sys, attrs; before = set(sys.modules); "
        "import holysheep._pricing; "
        "print(sorted({'socket', 'requests', 'httpx', 'anyio', 'asyncio', 'select'}"
        " & (set(sys.modules) - before)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "[]" == result.stdout.strip()


def test_a_completion_without_usage_is_priced_at_everything_the_model_wrote() -> None:
    """Only choice 0's text was counted: 400 of 4,400 characters for two choices ($0.0008
    instead of $0.0088), and nothing for tool-call arguments or reasoning."""
    call = ToolCall(id="c1", name="lookup", arguments='{"city": "Paris"}' + " " * 383)
    completion = Completion(
        choices=(
            Choice(0, text="a" * 400),
            Choice(1, text="b" * 3600, reasoning="r" * 400, tool_calls=(call,)),
        ),
        model="gpt-4.1",
    )
    cost = completion.cost
    assert cost is not None
    written = 400 + 3600 + 400 + len("lookup") + 400  # texts, reasoning, the call
    assert (pytest.approx(estimate_tokens("x" * written) * 8 / 1e6), True) == (
        cost.usd,
        cost.estimated,
    )
