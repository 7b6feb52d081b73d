"""The local upstream as a separate process, and a count of TCP connections to it.

`bench/client.py` measures clients, so the server must not share their process: in-process it
would compete for the GIL and its work would be billed to the client. `Upstream` runs
`python -m holysheep.testing` (its command-line flags are the contract, not its internals) and
reads the URL it prints. The connection count comes from the kernel (`/proc/net/tcp`), so it
works whatever the server is and whichever client library connects.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

__all__ = ["Upstream", "client_ports", "python_env", "raise_fd_limit"]

_URL = re.compile(r"(http://[\w.\[\]:-]+:(\d+)/v1)\b")
# A cold interpreter imports the upstream in well under a second; a loaded machine may take
# several. Past this, something is broken and the error shows the server's stderr.
_START_TIMEOUT = 30.0
# Closing 10,000 connections takes the server a moment; after this it is killed.
_STOP_TIMEOUT = 15.0
# /proc/net/tcp states (include/net/tcp_states.h) that do not belong to one connection.
_LISTEN = "0A"


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def python_env() -> dict[str, str]:
    """The environment for a child Python that must import the same holysheep as we do."""
    import holysheep

    root = str(Path(holysheep.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class Upstream:
    """`python -m holysheep.testing` in a child process for the duration of a `with` block."""

    def __init__(
        self,
        *,
        tokens: int | None = None,
        ttft: float | None = None,
        tokens_per_s: float | None = None,
    ) -> None:
        self.args = ["--port", "0"]
        if tokens is not None:
            self.args += ["--tokens", str(tokens)]
        if ttft is not None:
            self.args += ["--ttft", f"{ttft:g}"]
        if tokens_per_s is not None:
            self.args += ["--tokens-per-s", f"{tokens_per_s:g}"]
        self.url = ""
        self.port = 0
        self._process: subprocess.Popen[str] | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)

    def __enter__(self) -> Upstream:
        raise_fd_limit()  # the server holds one socket per client connection
        process = subprocess.Popen(
            [sys.executable, "-m", "holysheep.testing", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=python_env(),
        )
        self._process = process
        assert process.stdout is not None
        assert process.stderr is not None
        threading.Thread(target=self._drain, args=(process.stderr, True), daemon=True).start()
        try:
            self.url, self.port = self._read_url(process)
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self._drain, args=(process.stdout, False), daemon=True).start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the server has used so far (Linux), for "who was busy"."""
        if self._process is None:
            return None
        try:
            fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        # utime and stime are fields 14 and 15 of stat(5); [0] here is field 3.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _read_url(self, process: subprocess.Popen[str]) -> tuple[str, int]:
        assert process.stdout is not None
        deadline = time.monotonic() + _START_TIMEOUT
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not selector.select(left):
                    continue
                line = process.stdout.readline()
                if not line:
                    break  # the server exited
                found = _URL.search(line)
                if found:
                    return found.group(1), int(found.group(2))
        process.poll()
        tail = "".join(self._stderr).strip() or "(nothing on stderr)"
        raise RuntimeError(
            f"python -m holysheep.testing {' '.join(self.args)} printed no URL within "
            f"{_START_TIMEOUT:g} s (exit status {process.returncode}); stderr:\n{tail}"
        )

    def _drain(self, stream: object, keep: bool) -> None:
        # Read whatever the server prints so a full pipe never blocks it.
        for line in stream:  # type: ignore[attr-defined]
            if keep:
                self._stderr.append(line)


def client_ports(port: int) -> set[int] | None:
    """The client-side ports of every TCP connection to `port` on this machine, open or closed.

    A connection closed in the last minute is still listed, in TIME_WAIT on whichever side
    closed first, so the difference of two calls counts the connections opened in between.
    None where `/proc/net/tcp` does not exist (not Linux).
    """
    found: set[int] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] == _LISTEN:
                continue
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            if local == port:
                found.add(remote)
            elif remote == port:
                found.add(local)
    return found if readable else None
