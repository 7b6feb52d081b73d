"""The local upstream in a child process: `UpstreamProcess`.

`serve()` runs the upstream on a thread of the calling process, which is what tests want. A
measurement wants the opposite: a server in the same process competes with the client for the
GIL and its CPU and memory are billed to the client. `UpstreamProcess` runs `python -m
holysheep.testing` (whose flags are the contract, not its internals) and reads the URL it
prints; the `holysheep bench` command and the scripts in `bench/` both use it.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["UpstreamProcess", "raise_fd_limit"]

# A cold interpreter imports the upstream in well under a second; a loaded machine may take
# several. Past this, something is broken and the error shows the server's stderr.
START_TIMEOUT = 30.0
# Closing 10,000 connections takes the server a moment; after this it is killed.
STOP_TIMEOUT = 15.0
_URL = re.compile(rb"(http://[\w.\[\]:-]+:(\d+)/v1)\b")


class UpstreamProcess:
    """`python -m holysheep.testing` in a child process for the duration of a `with` block.

    `UpstreamProcess(ttft=0.3, tokens_per_s=50)`; any other flag of the command goes in
    `args` (`args=["--fault", "drop@5"]`). `base_url`, `port` and `pid` are set on entry.
    """

    def __init__(
        self,
        *,
        tokens: int | None = None,
        ttft: float | None = None,
        tokens_per_s: float | None = None,
        args: Sequence[str] = (),
    ) -> None:
        if isinstance(args, str):
            # A str is a sequence too: "--event-ids" became 11 arguments of one character.
            raise TypeError(f"args must be a list of arguments, such as [{args!r}], not a str")
        self.args = ["--port", "0"]
        if tokens is not None:
            self.args += ["--tokens", str(tokens)]
        if ttft is not None:
            self.args += ["--ttft", f"{ttft:g}"]
        if tokens_per_s is not None:
            self.args += ["--tokens-per-s", f"{tokens_per_s:g}"]
        self.args += list(args)
        self.base_url = ""
        self.port = 0
        self.pid = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    def __enter__(self) -> UpstreamProcess:
        # Its stderr goes to a file: nothing has to drain it, and it is there if start-up fails.
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "holysheep.testing", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=child_env(),
        )
        self.pid = self._process.pid
        try:
            self.base_url, self.port = self._read_url(self._process)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def cpu_seconds(self) -> float | None:
        """User + system CPU the upstream has used so far (Linux /proc); None elsewhere."""
        if self._process is None:
            return None
        try:
            stat = Path(f"/proc/{self._process.pid}/stat").read_text()
        except OSError:
            return None
        # utime and stime are fields 14 and 15 of proc_pid_stat(5); the name (field 2) is
        # in parentheses and may hold spaces, so count from after its closing one.
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after `STOP_TIMEOUT`); idempotent."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _read_url(self, process: subprocess.Popen[bytes]) -> tuple[str, int]:
        assert process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not selector.select(left):
                    continue
                line = process.stdout.readline()
                if not line:
                    break  # the child closed its stdout: it is exiting
                found = _URL.search(line)
                if found:
                    return found.group(1).decode(), int(found.group(2))
        # Its stdout closes a moment before it can be reaped: wait briefly for the status, so
        # the error says "exited with status 2" rather than nothing about it.
        try:
            status: int | None = process.wait(max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            status = None
        assert self._stderr is not None
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")
        said = [line.strip() for line in text.splitlines() if line.strip()]
        # The command's own error is one line ("...: error: ..."), after argparse's usage
        # lines; anything else (a traceback) is best told by its last lines.
        errors = [i for i, line in enumerate(said) if ": error: " in line]
        tail = " | ".join(said[errors[-1] :] if errors else said[-3:]) or "nothing on stderr"
        command = f"python -m holysheep.testing {' '.join(self.args)}"
        if status is None:
            raise RuntimeError(
                f"the local upstream ({command}) printed no URL within {START_TIMEOUT:g} s: {tail}"
            )
        raise RuntimeError(
            f"the local upstream ({command}) exited with status {status} before printing its"
            f" URL: {tail}"
        )


def child_env() -> dict[str, str]:
    """The environment for a child that must import this very holysheep.

    Installed normally, the child finds it in site-packages by itself; from a checkout on
    `sys.path` (`python -m holysheep` in the repository) it needs the checkout on PYTHONPATH.
    Site-packages itself is never put there: ahead of the standard library it could shadow it.
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent.parent)
    installed = {str(Path(p).resolve()) for p in sysconfig.get_paths().values() if p}
    if root not in installed:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def raise_fd_limit() -> int | None:
    """Raise the soft open-files limit to the hard one; children started later inherit it.

    Each open stream holds a socket on each side; the usual soft limit (1,024) fails a run of
    1,000 streams. Returns the limit now in force (None: unlimited, or no rlimits here).
    """
    if sys.platform == "win32":  # pragma: no cover - no rlimits there
        return None
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft
