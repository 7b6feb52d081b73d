"""`transports/` imports as `holysheep.transports` however holysheep is installed.

The repository keeps `transports/` at the top level and `holysheep/transports` is a symlink to
it. These tests prove the three ways code meets the package: a built wheel (sdist -> wheel, as
a user gets it), the editable install `make test` uses, and the repo root on `sys.path`; and
that mypy resolves the module in each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = "import holysheep.transports as t, holysheep; print(t.__file__); print(holysheep.__file__)"


def run(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_import_from_repo_root() -> None:
    """`python -c` from the root (root first on sys.path) finds the real transports files."""
    transports_file, _ = run([sys.executable, "-c", PROBE], ROOT).split()
    assert (ROOT / "transports" / "__init__.py").resolve() == Path(transports_file).resolve()


def test_import_from_editable_install(tmp_path: Path) -> None:
    """Outside the repo, the editable install maps to the same source files."""
    transports_file, package_file = run([sys.executable, "-c", PROBE], tmp_path).split()
    assert (ROOT / "transports" / "__init__.py").resolve() == Path(transports_file).resolve()
    assert (ROOT / "holysheep" / "__init__.py").resolve() == Path(package_file).resolve()


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # sdist first, then the wheel built from the sdist: the path a user's pip takes.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], ROOT)
    (wheel,) = out.glob("*.whl")
    target = out / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(target)
    assert {
        "holysheep/__init__.py",
        "holysheep/py.typed",
        "holysheep/_speedups.pyi",
        "holysheep/transports/__init__.py",
    } <= names
    if COMPILER:  # built from the sdist, so the sdist carries the C source and setup.py
        assert any(
            name.startswith("holysheep/_speedups.") and name.endswith((".so", ".pyd"))
            for name in names
        )
    return target


COMPILER = any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))


@pytest.mark.skipif(
    not COMPILER, reason="no C compiler here: the pure Python decoder is all there is"
)
@pytest.mark.skipif(
    os.environ.get("HOLYSHEEP_NO_EXTENSIONS", "").strip().lower()
    not in ("", "0", "false", "no", "off"),
    reason="turned off",
)
def test_the_c_part_is_built_where_there_is_a_compiler() -> None:
    """An optional build that failed would go unnoticed: on a machine with a compiler it is in."""
    from holysheep import _chat, _sse

    assert _sse._c_feed is not None
    assert _chat._c_feed is not None


@pytest.mark.skipif(not COMPILER, reason="no C compiler here: there is no C part to turn off")
@pytest.mark.parametrize(
    ("value", "off"),
    [("1", True), ("yes", True), ("0", False), ("", False), ("False", False), (" off ", False)],
)
def test_holysheep_no_extensions_turns_the_c_part_off(
    tmp_path: Path, value: str, off: bool
) -> None:
    """`HOLYSHEEP_NO_EXTENSIONS=1` turns the C part off; `=0` or `=false` leaves it on (any
    value turned it off)."""
    code = (
        "import holysheep._sse as s, holysheep._chat as c\n"
        "print(s._c_feed is None, c._c_feed is None)"
    )
    env = {**os.environ, "HOLYSHEEP_NO_EXTENSIONS": value}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert (0, f"{off} {off}\n") == (result.returncode, result.stdout), result.stderr


def test_holysheep_works_without_the_c_part(tmp_path: Path) -> None:
    """A machine that could not build _speedups.c imports and decodes with Python alone."""
    code = (
        "import sys; sys.modules['holysheep._speedups'] = None\n"
        "import holysheep, holysheep._sse as s, holysheep._chat as c\n"
        "assert s._c_feed is None and s._speedups is None and c._c_feed is None\n"
        "print(holysheep.SSEDecoder().feed(b'data: hi\\n\\n')[0].data)\n"
        "a = holysheep.ChatAccumulator()\n"
        'a.feed(b\'data: {"choices":[{"delta":{"role":"assistant"}}]}\\n\\n\')\n'
        'print(a.feed(b\'data: {"choices":[{"delta":{"content":"yo"}}]}\\n\\n\')[0].text)'
    )
    assert "hi\nyo\n" == run([sys.executable, "-c", code], tmp_path)


def test_import_from_built_wheel(wheel_dir: Path) -> None:
    """The wheel holds real files under holysheep/transports, and they import."""
    code = f"import sys; sys.path.insert(0, {str(wheel_dir)!r}); {PROBE}"
    transports_file, _ = run([sys.executable, "-c", code], ROOT.parent).split()
    assert wheel_dir / "holysheep" / "transports" / "__init__.py" == Path(transports_file)
    assert not Path(transports_file).parent.is_symlink()


@pytest.mark.parametrize("where", ["repo root", "built wheel"])
def test_mypy_sees_holysheep_transports(where: str, wheel_dir: Path, tmp_path: Path) -> None:
    """mypy resolves `holysheep.transports` without import hooks."""
    probe = tmp_path / "probe.py"
    probe.write_text("import holysheep.transports\nreveal_type(holysheep.transports.__all__)\n")
    cwd = ROOT if where == "repo root" else wheel_dir
    out = run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(probe)], cwd)
    assert 'Revealed type is "list[str]"' in out
    assert "Success: no issues found" in out
