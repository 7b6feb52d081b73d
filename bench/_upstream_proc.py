"""The local upstream as a separate process, and a count of TCP connections to it.

`bench/client.py` measures clients, so the server must not share their process: in-process it
would compete for the GIL and its work would be billed to the client. `Upstream` is
`holysheep.testing.UpstreamProcess` (`python -m holysheep.testing` in a child process) under
the names the scripts here use. The connection count comes from the kernel (`/proc/net/tcp`),
so it works whatever the server is and whichever client library connects.
"""

from __future__ import annotations

from holysheep.testing import UpstreamProcess, raise_fd_limit
from holysheep.testing._process import child_env as python_env

__all__ = ["Upstream", "client_ports", "python_env", "raise_fd_limit"]

# /proc/net/tcp states (include/net/tcp_states.h) that do not belong to one connection.
_LISTEN = "0A"


class Upstream(UpstreamProcess):
    """`python -m holysheep.testing` for a `with` block; `url` is its base URL."""

    def __enter__(self) -> Upstream:
        raise_fd_limit()  # the server holds one socket per client connection
        super().__enter__()
        return self

    @property
    def url(self) -> str:
        return self.base_url


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
