"""Reaching out, briefly: one short connection attempt before a download, and a bound on how
long a download may stall.

A machine with no route fails a connect at once, but one behind a firewall that drops packets
waits for the kernel's TCP timeout (minutes), and libraries add retries on top. Every download
the toolkit starts (the official datasets, pretrained weights from the hub) probes its host
first, so such a machine gets one line in seconds naming the offline way instead.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

PROBE_SECONDS = 5.0  # one connection attempt before a download
STALL_SECONDS = 60.0  # a download that receives nothing for this long fails


def unreachable(url: str) -> str | None:
    """Why `url`'s host (or the HTTPS proxy in the environment) cannot be connected to within
    PROBE_SECONDS; None when it can."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlparse(proxy if proxy else url)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or type(exc).__name__}"
    return None


@contextmanager
def stall_timeout(seconds: float = STALL_SECONDS) -> Iterator[None]:
    """Sockets opened inside (urllib's, which takes no timeout of its own when a library
    does not pass one) give up after `seconds` without data, instead of never."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)
