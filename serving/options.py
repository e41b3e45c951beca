"""The server's command line, declared once: `python -m serving.app` and `toolkit serve`
(which passes its arguments to serving.app.main) both parse it here; plus the checks on what
it was given (the --auth format, a warning when the server is exposed without a password).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from serving.api import DEFAULT_MAX_IN_FLIGHT

AUTH_ENV = "TOOLKIT_AUTH"
DEFAULT_MAX_UPLOAD_MB = 10.0
# Page predictions waiting in Gradio's queue; past it a visitor is told the queue is full.
DEFAULT_MAX_QUEUE = 64


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'user:password' -> (user, password); the password may itself contain ':'."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not (user and sep and password):
        raise ValueError("--auth must look like user:password")
    return user, password


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name may resolve to any interface: assume exposed
        return False


def exposure_warning(host: str, auth: tuple[str, str] | None) -> str | None:
    """What to tell the person starting a server that other machines can use without a
    password; None when it is bound to loopback or protected by --auth."""
    if auth or is_loopback(host):
        return None
    return (
        f"listening on {host}, reachable from other machines, without a password; "
        f"pass --auth user:password or set ${AUTH_ENV} unless a proxy in front checks access"
    )


def parse_args(argv: list[str] | None, prog: str = "python -m serving.app") -> argparse.Namespace:
    """The command line (argv=None: sys.argv); --auth falls back to $TOOLKIT_AUTH.

    The one declaration of the server's options: `toolkit serve` passes its arguments here.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve exported image classifiers: the Gradio page and, on the same "
        "port, the inference API.",
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=Path("artifacts"),
        help="folder of <dataset>-<model>/ model folders (default: artifacts)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1; 0.0.0.0: every one)",
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--auth",
        default=None,
        help=f"user:password required to use the page and the API (or ${AUTH_ENV})",
    )
    parser.add_argument(
        "--share", action="store_true", help="ask Gradio for a public share link (off by default)"
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"largest accepted upload (default {DEFAULT_MAX_UPLOAD_MB:g} MB)",
    )
    parser.add_argument(
        "--max-in-flight",
        type=int,
        default=DEFAULT_MAX_IN_FLIGHT,
        help="inference API requests handled at once; more get 503 with Retry-After "
        f"(default {DEFAULT_MAX_IN_FLIGHT})",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help=f"page predictions that may wait in line; more are refused (default "
        f"{DEFAULT_MAX_QUEUE})",
    )
    args = parser.parse_args(argv)
    try:
        args.auth = parse_auth(args.auth or os.environ.get(AUTH_ENV))
    except ValueError as exc:
        parser.error(str(exc))
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")
    if args.max_in_flight < 1 or args.max_queue < 1:
        parser.error("--max-in-flight and --max-queue must be at least 1")
    return args
