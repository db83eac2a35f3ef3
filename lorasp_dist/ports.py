"""A free TCP port on the loopback interface, for a process group or a Ray instance that this host starts."""

from __future__ import annotations

import socket


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
