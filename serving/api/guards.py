"""What stands between a request and a model: the password (HTTP Basic), the bound on
requests in flight (backpressure), and checks on how a body is sent."""

from __future__ import annotations

import base64
import secrets

from starlette.requests import Request

from serving.answer import TOP_K
from serving.api.metrics import Metrics
from serving.api.oip import RequestError

RETRY_AFTER_S = 1


class Gate:
    """The bound on inference requests in flight. Touched only from the event loop, so a plain
    counter is enough."""

    def __init__(self, limit: int, metrics: Metrics):
        self.limit = limit
        self.active = 0
        self.gauge = metrics.in_flight

    def __enter__(self) -> None:
        if self.active >= self.limit:
            raise RequestError(
                f"the server is busy ({self.limit} inference requests in progress); retry in "
                f"{RETRY_AFTER_S} s",
                status=503,
                kind="overloaded",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.active += 1
        self.gauge.inc()

    def __exit__(self, *exc: object) -> None:
        self.active -= 1
        self.gauge.dec()


def authorized(request: Request, auth: tuple[str, str]) -> bool:
    """Whether the request carries `auth` as HTTP Basic credentials (compared in constant
    time, both parts always, so timing says nothing about which part was wrong)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, sep, password = base64.b64decode(token, validate=True).decode().partition(":")
    except ValueError:  # not base64, or not UTF-8
        return False
    same_user = secrets.compare_digest(user.encode(), auth[0].encode())
    same_password = secrets.compare_digest(password.encode(), auth[1].encode())
    return bool(sep) and same_user and same_password


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def check_encoding(request: Request) -> None:
    """Compressed bodies are refused: inflating one would bypass the body cap."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise RequestError(
            f"Content-Encoding {encoding[:40]!r} is not accepted; send the body uncompressed",
            status=415,
            kind="unsupported_media_type",
        )


def unsupported(media: str, wanted: str) -> RequestError:
    return RequestError(
        f"Content-Type {media[:60]!r} is not accepted here; send {wanted}",
        status=415,
        kind="unsupported_media_type",
    )


def top_k(text: str | None, classes: int) -> int:
    if text is None:
        return min(TOP_K, classes)
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= classes):
        raise RequestError(f"top_k must be a whole number from 1 to {classes}, not {text[:20]!r}")
    return int(text)
