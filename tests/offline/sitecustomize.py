"""An air gap inside Python: every attempt to reach a host other than this machine is refused,
as an offline machine would refuse it, and written down, so that a library that swallows the
failure (an analytics ping, a version check) is still caught.

tests/test_offline_flow.py puts this folder first on PYTHONPATH with $TOOLKIT_OFFLINE_LOG set,
so every Python process of the flow loads it at start-up: the commands, their workers and the
server (it shadows any other sitecustomize there). Without that variable it does nothing. It
watches name lookups (getaddrinfo, gethostbyname) and connections (connect, connect_ex,
sendto) of internet sockets; Unix sockets, loopback and the unspecified address (this
machine) pass. Code that opens sockets below Python escapes it: the network namespace the
test runs in, where it can, covers that.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import sys
import traceback

LOG_ENV = "TOOLKIT_OFFLINE_LOG"
LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def address_of(host: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    """`host` as sockets take it: an IP address, or a name (lower case)."""
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    name = str(host).strip().strip("[]").lower().partition("%")[0]  # fe80::1%eth0
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return name


def is_local(host: object) -> bool:
    """Whether `host` is this machine: loopback, the unspecified address, localhost."""
    if host is None:  # getaddrinfo(None, port): the passive address a server binds
        return True
    address = address_of(host)
    if isinstance(address, str):
        return address in LOCAL_NAMES or address == ""
    return address.is_loopback or address.is_unspecified


def needs_lookup(host: object) -> bool:
    """Whether resolving `host` asks a name server: any name but this machine's. An address
    resolves to itself; connecting to it is what the connect guard judges."""
    return not is_local(host) and isinstance(address_of(host), str)


def record(what: str, target: object) -> None:
    """Append one attempt (what, where to, which process, the stack that made it) as a JSON
    line; O_APPEND keeps lines from several processes whole."""
    entry = {
        "what": what,
        "target": repr(target),
        "pid": os.getpid(),
        "argv": sys.argv[:4],
        "stack": [f for f in traceback.format_stack(limit=16) if __file__ not in f],
    }
    with open(os.environ[LOG_ENV], "a") as log:
        log.write(json.dumps(entry) + "\n")


def refuse_lookup(what: str, host: object) -> None:
    if needs_lookup(host):
        record(what, host)
        raise socket.gaierror(socket.EAI_AGAIN, f"offline test: no name lookup of {host!r}")


def refuse_connect(sock: socket.socket, what: str, address: object) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    host = address[0] if isinstance(address, tuple) and address else address
    if not is_local(host):
        record(what, address)
        raise OSError(errno.ENETUNREACH, f"offline test: no connection to {address!r}")


def install() -> None:
    lookups = {
        "getaddrinfo": socket.getaddrinfo,
        "gethostbyname": socket.gethostbyname,
        "gethostbyname_ex": socket.gethostbyname_ex,
    }

    def guarded_lookup(name, real):
        def lookup(host, *args, **kwargs):
            refuse_lookup(name, host)
            return real(host, *args, **kwargs)

        return lookup

    for name, real in lookups.items():
        setattr(socket, name, guarded_lookup(name, real))

    connect, connect_ex, sendto = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.socket.sendto,
    )

    def guarded_connect(self, address):
        refuse_connect(self, "connect", address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        refuse_connect(self, "connect_ex", address)
        return connect_ex(self, address)

    def guarded_sendto(self, data, *args):
        refuse_connect(self, "sendto", args[-1])  # sendto(data[, flags], address)
        return sendto(self, data, *args)

    socket.socket.connect = guarded_connect
    socket.socket.connect_ex = guarded_connect_ex
    socket.socket.sendto = guarded_sendto


if os.environ.get(LOG_ENV):
    install()
