"""What a completion costs, and what a month of traffic costs per route: pure arithmetic.

Theory of operation
-------------------
A `PriceTable` holds two maps from model name to `Price` (USD per million tokens, input and
output apart): `gateway`, what the holysheep gateway charges, and `direct`, what the model's own
provider charges, kept only as the comparison for `monthly_roi`. The built-in figures are
pinned in this file on purpose: a price that changes silently with a network fetch would make
yesterday's cost report disagree with today's for the same usage. Anyone whose prices differ
overrides them with a TOML file (`HOLYSHEEP_PRICES`, or `PriceTable.from_toml`) or builds a
table in code.

Model names are matched the way people write them: case-insensitive, with or without a provider
prefix (`openai/gpt-4.1`) and with or without a dated snapshot suffix (`gpt-4.1-2025-04-14`,
which is what providers report as the model of a completion). Never by prefix: `gpt-4.1-mini`
is a different, cheaper model, not `gpt-4.1`.

When a server sent no usage, `cost_of` counts tokens with `estimate_tokens` and marks the cost
`estimated`, so a report never presents a guess as a bill.

Nothing here reads a clock or a socket; the only I/O is `from_toml` reading the file it is
given, and `from_environment` reading the one it is pointed at.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, final

import attrs

from ._exceptions import ConfigurationError

__all__ = [
    "PRICES_ENV",
    "Cost",
    "Price",
    "PriceTable",
    "RoiRow",
    "cost_of",
    "estimate_tokens",
    "monthly_roi",
    "normalize_model",
    "parse_token_count",
    "provider_of",
]

PRICES_ENV = "HOLYSHEEP_PRICES"

# tomllib is stdlib from 3.11; on 3.10 the same parser ships as `tomli`, if installed. Loaded by
# name so that type checking for 3.10 does not require tomli to be present.
_toml_loads: Callable[[str], dict[str, Any]] | None
if sys.version_info >= (3, 11):
    import tomllib

    _toml_loads = tomllib.loads
else:  # pragma: no cover - exercised on 3.10 only
    try:
        _toml_loads = importlib.import_module("tomli").loads
    except ModuleNotFoundError:
        _toml_loads = None

# OpenAI's rule of thumb for English text: a token is about four characters. Good to within
# ~25% for prose, which is why every cost derived from it is marked estimated.
_CHARS_PER_TOKEN = 4
_MILLION = 1_000_000
# A snapshot suffix as providers report it: gpt-4.1-2025-04-14, claude-sonnet-4-5-20250929.
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")
# A major-minor version with a dash for the dot, one digit each: 4-5, v3-2 (not 4-0613).
_DASHED_VERSION = re.compile(r"-(v?\d)-(\d)(?=-|$)")
_SUFFIXES = {"": 1, "K": 1_000, "M": 1_000_000, "B": 1_000_000_000}
# A comma separates thousands only in groups of three (1,000,000): in many locales it is the
# decimal mark, and "1,5M" read as 15M would be ten times the volume meant.
_COUNT = re.compile(r"^\s*(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?\s*([KMB]?)\s*$", re.IGNORECASE)
# Who sells a model directly, by name prefix: used only to label the comparison rows.
_PROVIDERS = (
    ("gpt-", "OpenAI"),
    ("o1", "OpenAI"),
    ("o3", "OpenAI"),
    ("o4", "OpenAI"),
    ("claude", "Anthropic"),
    ("gemini", "Google"),
    ("deepseek", "DeepSeek"),
)


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    # bool is an int to Python, but `input = true` in a price file is a mistake, not $1.
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value >= 0):
        raise ConfigurationError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


@final
@attrs.frozen
class Price:
    """USD per million tokens, prompt (input) and completion (output) apart.

    `Price.blended(8.0)` is for the many price lists that quote one figure for both.
    """

    input_per_million: float = attrs.field(validator=_non_negative)
    output_per_million: float = attrs.field(validator=_non_negative)

    @classmethod
    def blended(cls, per_million: float) -> Price:
        return cls(per_million, per_million)

    @property
    def is_blended(self) -> bool:
        return self.input_per_million == self.output_per_million

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float:
        """USD for this many tokens (floats allowed: monthly volumes are split by a share)."""
        return (
            prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million
        ) / _MILLION


@final
@attrs.frozen
class Cost:
    """What one completion cost; `estimated` when token counts were guessed from text."""

    usd: float
    estimated: bool = False


def normalize_model(model: str) -> str:
    """The key a model is priced under: lower case, no provider prefix, no snapshot date, and a
    version written with a dot (`claude-sonnet-4-5`, Anthropic's own id, is `claude-sonnet-4.5`
    as gateways list it; `claude-3-5-haiku` is `claude-3.5-haiku`)."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    return _DASHED_VERSION.sub(r"-\1.\2", _SNAPSHOT.sub("", name))


def provider_of(model: str) -> str:
    """Who sells `model` directly (for labels); "direct" when we do not know."""
    name = normalize_model(model)
    for prefix, provider in _PROVIDERS:
        if name.startswith(prefix):
            return provider
    return "direct"


def _normalized(prices: Mapping[str, Price]) -> dict[str, Price]:
    return {normalize_model(name): price for name, price in prices.items()}


@final
@attrs.frozen
class PriceTable:
    """Gateway prices per model, and direct-provider prices to compare them with.

    `source` says where the figures came from, so a report can print it next to the numbers.
    """

    gateway: Mapping[str, Price] = attrs.field(factory=dict, converter=_normalized)
    direct: Mapping[str, Price] = attrs.field(factory=dict, converter=_normalized)
    source: str = "custom table"

    @classmethod
    def default(cls) -> PriceTable:
        """The pinned built-in prices (USD per 1M tokens, one figure for input and output).

        These are the figures the holysheep gateway publishes for its four models, and the
        direct gpt-4.1 price it compares itself with. They change only with a holysheep
        release; check them against your own bill and override them when they differ.
        """
        return cls(
            gateway={
                "gpt-4.1": Price.blended(8.00),
                "claude-sonnet-4.5": Price.blended(15.00),
                "gemini-2.5-flash": Price.blended(2.50),
                "deepseek-v3.2": Price.blended(0.42),
            },
            direct={"gpt-4.1": Price.blended(60.00)},
            source="built-in prices",
        )

    @classmethod
    def from_toml(
        cls, path: str | os.PathLike[str], *, base: PriceTable | None = None
    ) -> PriceTable:
        """Prices from a TOML file, laid over `base` (default: the built-in table).

        ```toml
        [gateway]
        "gpt-4.1" = 8.0                                  # one price for input and output
        "claude-sonnet-4.5" = { input = 3.0, output = 15.0 }
        [direct]
        "gpt-4.1" = { input = 2.0, output = 8.0 }
        ```

        Models the file names replace those in `base`; the others stay. To use only the
        file's prices, pass `base=PriceTable()`.
        """
        if _toml_loads is None:
            raise ConfigurationError(
                f"cannot read {os.fspath(path)}: reading TOML needs Python 3.11+ or `tomli`"
            )
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read prices from {os.fspath(path)}: {exc}") from exc
        text = _utf8_text(raw, path)
        try:
            data = _toml_loads(text)
        except ValueError as exc:  # tomllib.TOMLDecodeError is a ValueError
            raise ConfigurationError(f"{os.fspath(path)} is not valid TOML: {exc}") from exc
        base = cls.default() if base is None else base
        unknown = set(data) - {"gateway", "direct"}
        if unknown:
            raise ConfigurationError(
                f"{os.fspath(path)}: unknown section(s) {', '.join(sorted(unknown))};"
                " expected [gateway] and [direct]"
            )
        return cls(
            gateway={**base.gateway, **_read_section(data, "gateway", path)},
            direct={**base.direct, **_read_section(data, "direct", path)},
            source=os.fspath(path),
        )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> PriceTable:
        """The built-in table, overridden by the file `HOLYSHEEP_PRICES` names, if any.

        On Python 3.10 without `tomli` the file cannot be parsed; rather than fail a command
        that only wanted to print a cost, the built-in table is used and `source` says why.
        """
        environ = os.environ if environ is None else environ
        path = environ.get(PRICES_ENV)
        if not path:
            return cls.default()
        if _toml_loads is None:  # pragma: no cover - Python 3.10 without tomli
            return attrs.evolve(
                cls.default(),
                source=f"built-in prices ({PRICES_ENV} ignored: needs Python 3.11+ or tomli)",
            )
        try:
            return cls.from_toml(path)
        except ConfigurationError as exc:
            # Whoever meets it may not know where the file came from: say it.
            raise ConfigurationError(f"{exc} (the prices file {PRICES_ENV} names)") from exc

    def lookup(self, model: str) -> Price | None:
        """The gateway price of `model`, or None when the table does not know it."""
        return self.gateway.get(normalize_model(model))

    def lookup_direct(self, model: str) -> Price | None:
        """What `model` costs straight from its provider, when known."""
        return self.direct.get(normalize_model(model))


def _read_section(data: Mapping[str, Any], section: str, path: object) -> dict[str, Price]:
    table = data.get(section, {})
    if not isinstance(table, Mapping):
        raise ConfigurationError(f"{path}: [{section}] must be a table of model = price")
    prices: dict[str, Price] = {}
    for model, value in table.items():
        where = f"{path}: [{section}] {model!r}"
        try:
            if isinstance(value, Mapping):
                extra = set(value) - {"input", "output"}
                if extra or not value:
                    raise ValueError(f"expected keys input and/or output, got {sorted(value)}")
                for side, figure in value.items():
                    if isinstance(figure, bool) or not isinstance(figure, int | float):
                        raise ValueError(f"expected a number for {side}, got {figure!r}")
                # One side given: it is the only figure known, so it applies to both.
                known = value.get("input", value.get("output"))
                price = Price(float(value.get("input", known)), float(value.get("output", known)))
            elif isinstance(value, int | float) and not isinstance(value, bool):
                price = Price.blended(float(value))
            else:
                raise ValueError(
                    f"expected a number or {{ input = ..., output = ... }}, got {value!r}"
                )
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{where}: {exc}") from exc
        prices[model] = price
    return prices


def _utf8_text(raw: bytes, path: str | os.PathLike[str]) -> str:
    """A TOML file's text. TOML is UTF-8; a byte-order mark before it (Notepad writes one) is
    dropped, and UTF-16 (what Windows PowerShell 5.1 writes by default) is named as such."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigurationError(
            f"{os.fspath(path)} is UTF-16, and a TOML file must be UTF-8: save it as UTF-8 "
            "(in PowerShell: Out-File -Encoding utf8)"
        )
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigurationError(
            f"{os.fspath(path)} is not UTF-8, as a TOML file must be: byte "
            f"{raw[exc.start]:#04x} at offset {exc.start} does not decode"
        ) from exc


def estimate_tokens(text: str) -> int:
    """About how many tokens `text` is (four characters a token, rounded up)."""
    return -(-len(text) // _CHARS_PER_TOKEN)


def cost_of(
    usage_prompt: int | None,
    usage_completion: int | None,
    model: str,
    table: PriceTable | None = None,
    *,
    prompt_text: str = "",
    completion_text: str = "",
) -> Cost | None:
    """What a completion of `model` cost through the gateway; None if the model has no price.

    Counts the server did not report (None) are estimated from `prompt_text` and
    `completion_text`, and the cost is then marked `estimated`.
    """
    price = (table if table is not None else PriceTable.default()).lookup(model)
    if price is None:
        return None
    estimated = usage_prompt is None or usage_completion is None
    prompt = usage_prompt if usage_prompt is not None else estimate_tokens(prompt_text)
    completion = (
        usage_completion if usage_completion is not None else estimate_tokens(completion_text)
    )
    return Cost(price.cost(prompt, completion), estimated)


def parse_token_count(text: str) -> int:
    """`500M` -> 500_000_000: a count with an optional K, M or B suffix (decimal, 1.5B);
    commas only between groups of three digits (1,000,000), and no amount under one token."""
    match = _COUNT.match(text.replace("_", ""))
    if match is None:
        raise ConfigurationError(
            f"expected a token count such as 500M, 1.5B, 20000 or 1,000,000 (a comma only"
            f" between groups of three digits; 1.5M, not 1,5M), got {text!r}"
        )
    whole, fraction, suffix = match.groups()
    number = float(whole.replace(",", "") + (fraction or ""))
    count = round(number * _SUFFIXES[suffix.upper()])
    if count == 0 and number > 0:
        raise ConfigurationError(f"{text.strip()!r} is less than one token")
    return count


@final
@attrs.frozen
class RoiRow:
    """One route in a monthly cost comparison.

    `savings_usd` and `savings_ratio` compare with the direct price of the model asked about
    (None when the table has no direct price for it); the direct row itself is the `baseline`.
    `selected` marks the gateway row for the model asked about; other gateway rows show what
    switching model would save as well.
    """

    provider: str
    route: str
    model: str
    price: Price
    monthly_usd: float
    savings_usd: float | None
    savings_ratio: float | None
    baseline: bool = False
    selected: bool = False


def monthly_roi(
    tokens_per_month: int,
    model: str,
    table: PriceTable | None = None,
    *,
    output_share: float = 0.5,
) -> list[RoiRow]:
    """The monthly cost of `tokens_per_month` on every route, with the savings vs direct.

    Rows: the direct route for `model` (if priced), `model` through the gateway, then the
    gateway's other models from dearest to cheapest. `output_share` splits the volume into
    completion and prompt tokens; it only matters where input and output prices differ, and
    an even split is the neutral guess when nobody says otherwise.
    Raises `LookupError` when the gateway has no price for `model`.
    """
    if tokens_per_month < 0:
        raise ConfigurationError(f"tokens_per_month must be >= 0, got {tokens_per_month}")
    if not 0 <= output_share <= 1:
        raise ConfigurationError(f"output_share must be between 0 and 1, got {output_share}")
    table = table if table is not None else PriceTable.default()
    key = normalize_model(model)
    if table.lookup(key) is None:
        known = ", ".join(sorted(table.gateway)) or "none"
        raise LookupError(f"no gateway price for model {model!r} (known: {known})")
    completion = tokens_per_month * output_share
    prompt = tokens_per_month - completion
    direct = table.lookup_direct(key)
    baseline = direct.cost(prompt, completion) if direct is not None else None

    def row(provider: str, route: str, name: str, price: Price, **flags: bool) -> RoiRow:
        monthly = price.cost(prompt, completion)
        savings = None if baseline is None or flags.get("baseline") else baseline - monthly
        ratio = None if savings is None or not baseline else savings / baseline
        return RoiRow(provider, route, name, price, monthly, savings, ratio, **flags)

    rows = []
    if direct is not None:
        rows.append(row(provider_of(key), "direct", key, direct, baseline=True))
    others = sorted(
        ((name, price) for name, price in table.gateway.items() if name != key),
        key=lambda item: (-item[1].cost(prompt, completion), item[0]),
    )
    for name, price in [(key, table.gateway[key]), *others]:
        rows.append(row("HolySheep", "gateway", name, price, selected=name == key))
    return rows
