"""docs/reference.md stays true to the code: every public name has an entry, every
`holysheep...` name the page mentions exists, and its signatures and members are the real ones.

An entry is a heading (or an errors-table row) whose first code span names the object, with
its parameters when it is callable: "### `holysheep.RetryPolicy(attempts=4, ...)`". Below a
heading, a code span starting with a dot ("`.backoff(attempt, random)`", "`.text`") is one of
the object's members. A `...` default means "described in the text" and is not compared.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

import holysheep
import holysheep.testing
import holysheep.transports
from holysheep.transports import MockTransport

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"
MODULES = {
    "holysheep": holysheep,
    "holysheep.transports": holysheep.transports,
    "holysheep.testing": holysheep.testing,
}
# Public, but kept out of `__all__` so that `import *` does not import aiohttp.
LAZY = {"holysheep.transports.AiohttpTransport"}
PUBLIC = {f"{module}.{name}" for module, obj in MODULES.items() for name in obj.__all__} | LAZY

ENTRY = re.compile(r"^(?:#{2,4} |\| )`(?P<target>[\w.]+)(?:\((?P<params>.*?)\))?`", re.MULTILINE)
HEADING = re.compile(r"^#{1,4} ", re.MULTILINE)
MEMBER = re.compile(r"`\.(?P<name>\w+)(?:\((?P<params>[^`]*)\))?`")
# `holysheep.X.Y`, but not the host in https://api.holysheep.ai.
QUALIFIED = re.compile(r"(?<![\w./-])holysheep(?:\.\w+)+")


def _chat() -> Any:
    client = holysheep.Client(api_key="k", transport=MockTransport([]))
    client.close()
    return client.chat


# Entries for what users reach through an instance rather than by name.
THROUGH_INSTANCES: dict[str, Callable[[], Any]] = {
    "client.chat.stream": lambda: _chat().stream,
    "client.chat.complete": lambda: _chat().complete,
}


class Entry:
    def __init__(self, target: str, params: str | None, section: str) -> None:
        self.target = target
        self.params = params
        self.section = section

    def __repr__(self) -> str:
        return self.target


def entries() -> list[Entry]:
    text = REFERENCE.read_text()
    found = list(ENTRY.finditer(text))
    result = []
    for match in found:
        if match.group(0).startswith("|"):  # a table row: its own line is its section
            section = text[match.start() : text.find("\n", match.start())]
        else:
            after = match.end()
            ends = [m.start() for m in HEADING.finditer(text, after)]
            ends += [m.start() for m in found if m.start() > after]
            section = text[after : min(ends, default=len(text))]
        result.append(Entry(match["target"], match["params"], section))
    return result


ENTRIES = entries()


def resolve(target: str) -> Any:
    if target in THROUGH_INSTANCES:
        return THROUGH_INSTANCES[target]()
    parts = target.split(".")
    obj: Any = holysheep
    for part in parts[1:]:
        obj = getattr(obj, part)
    return obj


def documented(params: str) -> list[tuple[str, inspect._ParameterKind, ast.expr | None]]:
    """A parameter list as written on the page: names, kinds and default expressions."""
    args = ast.parse(f"def f({params}): pass").body[0].args  # type: ignore[attr-defined]
    kind = inspect.Parameter
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    result = [
        (a.arg, kind.POSITIONAL_OR_KEYWORD, d) for a, d in zip(positional, defaults, strict=True)
    ]
    if args.vararg is not None:
        result.append((args.vararg.arg, kind.VAR_POSITIONAL, None))
    result += [
        (a.arg, kind.KEYWORD_ONLY, d)
        for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)
    ]
    if args.kwarg is not None:
        result.append((args.kwarg.arg, kind.VAR_KEYWORD, None))
    return result


def actual(obj: Any, *, drop_self: bool = False) -> list[inspect.Parameter]:
    parameters = list(inspect.signature(obj).parameters.values())
    return parameters[1:] if drop_self else parameters


def page_default(node: ast.expr, module: Any) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:  # a name or a call: `DEFAULT_TEXT`, `Timeouts()`, `sse_body(...)`
        return eval(ast.unparse(node), {**vars(holysheep), **vars(module)})


def real_default(obj: Any, parameter: inspect.Parameter) -> tuple[Any, Callable[[Any], Any]]:
    """The default, and how the class converts a value given for it (attrs factories and
    converters: `Usage(raw=...)` defaults to a fresh dict, `MockResponse(chunks=...)` keeps a
    tuple)."""
    is_attrs = inspect.isclass(obj) and attrs.has(obj)
    field = attrs.fields_dict(obj).get(parameter.name) if is_attrs else None
    convert = (field.converter if field is not None else None) or (lambda value: value)
    default = parameter.default
    if field is not None and isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        default = field.default.factory()
    return convert(default), convert


def check_parameters(where: str, params: str, obj: Any, *, drop_self: bool = False) -> None:
    page = documented(params)
    real = actual(obj, drop_self=drop_self)
    assert [(p.name, p.kind) for p in real] == [(n, k) for n, k, _ in page], where
    module = inspect.getmodule(obj) or holysheep
    for (name, _, node), parameter in zip(page, real, strict=True):
        has_default = parameter.default is not inspect.Parameter.empty
        assert (node is not None) == has_default, f"{where}: the default of {name}"
        if node is None or (isinstance(node, ast.Constant) and node.value is Ellipsis):
            continue
        expected, convert = real_default(obj, parameter)
        assert expected == convert(page_default(node, module)), f"{where}: default of {name}"


def members(entry: Entry) -> Iterator[tuple[str, str | None]]:
    for match in MEMBER.finditer(entry.section):
        yield match["name"], match["params"]


def has_member(obj: Any, name: str) -> bool:
    if hasattr(obj, name):
        return True
    # Set in `__init__` (not a class attribute): `client.chat`, `exc.message`.
    init = getattr(obj, "__init__", None)
    try:
        source = inspect.getsource(init) if init is not None else ""
    except (OSError, TypeError):
        return False
    return re.search(rf"\bself\.{name}\b(\s*:[^=\n]+)?\s*=", source) is not None


def test_every_public_name_has_an_entry() -> None:
    """Each name in the three `__all__`s (and the lazily imported AiohttpTransport) has one."""
    assert set() == PUBLIC - {entry.target for entry in ENTRIES}


def test_entries_are_public() -> None:
    """The page documents no private or removed name as an entry, and none twice."""
    targets = [entry.target for entry in ENTRIES]
    assert set() == set(targets) - PUBLIC - THROUGH_INSTANCES.keys()
    assert sorted(targets) == sorted(set(targets))


def test_every_qualified_name_exists() -> None:
    """Every `holysheep.X...` the page mentions, anywhere, resolves."""
    missing = []
    for name in sorted(set(QUALIFIED.findall(REFERENCE.read_text()))):
        try:
            resolve(name)
        except AttributeError:
            missing.append(name)
    assert [] == missing


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.params is not None], ids=repr)
def test_signature_matches(entry: Entry) -> None:
    """The documented parameters are the real ones: names, kinds and defaults."""
    assert entry.params is not None
    check_parameters(entry.target, entry.params, resolve(entry.target))


@pytest.mark.parametrize("entry", [e for e in ENTRIES if any(members(e))], ids=repr)
def test_members_exist(entry: Entry) -> None:
    """Each `.member` listed under an entry exists; a method's parameters are the real ones."""
    obj = resolve(entry.target)
    for name, params in members(entry):
        assert has_member(obj, name), f"{entry.target} has no member {name!r}"
        if params is None:
            continue
        member = inspect.getattr_static(obj, name)
        if isinstance(member, staticmethod | classmethod):
            check_parameters(f"{entry.target}.{name}", params, getattr(obj, name))
        else:
            assert callable(member), f"{entry.target}.{name} is documented as a method"
            check_parameters(f"{entry.target}.{name}", params, member, drop_self=True)


def test_the_async_twins_take_the_same_arguments() -> None:
    """The page documents `AsyncClient`'s `chat.stream` and `chat.complete` through `Client`'s."""
    from holysheep._async_client import AsyncChat
    from holysheep._client import Chat

    for name in ("stream", "complete"):
        sync, async_ = actual(getattr(Chat, name)), actual(getattr(AsyncChat, name))
        assert [(p.name, p.kind, p.default) for p in sync] == [
            (p.name, p.kind, p.default) for p in async_
        ]
