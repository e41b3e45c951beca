"""A cap on every request body, enforced before the app reads it.

Gradio limits each *uploaded file* (`max_file_size`), but its JSON routes (queue/join,
call/<api>) read and parse whatever body arrives: one unauthenticated 200 MB POST grows the
server by more than 500 MB. `BodyLimit` answers 413 as soon as a declared Content-Length or
the bytes actually streamed pass the limit, so no request can make the server hold more
than about the upload cap. Routes with bodies of their own size (the inference API's tensors
and image uploads) get their own caps, by path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.exceptions import HTTPException

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Multipart framing around one uploaded file (boundaries, part headers, file name).
MULTIPART_SLACK = 64 * 1024
# The app's JSON bodies name an uploaded file and a model: a few hundred bytes.
JSON_BODY_LIMIT = 1024 * 1024
UPLOAD_PATH_SUFFIX = "/gradio_api/upload"


class BodyTooLarge(HTTPException):
    """Raised from `receive` mid-stream; FastAPI turns it into a 413 response."""

    def __init__(self, limit: int):
        super().__init__(413, f"Request body exceeds the maximum allowed size of {limit} bytes.")


class BodyLimit:
    """ASGI middleware: an upload may carry one file up to the cap, a path matching one of
    `limits` (pattern, bytes) up to its own cap, any other request 1 MiB."""

    def __init__(
        self,
        app: ASGIApp,
        max_upload_bytes: int,
        limits: Sequence[tuple[re.Pattern[str], int]] = (),
    ):
        self.app = app
        self.upload_limit = max_upload_bytes + MULTIPART_SLACK
        self.limits = limits

    def limit_for(self, path: str) -> int:
        for pattern, limit in self.limits:
            if pattern.fullmatch(path):
                return limit
        return JSON_BODY_LIMIT

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        upload = path.endswith(UPLOAD_PATH_SUFFIX)
        limit = self.upload_limit if upload else self.limit_for(path)
        declared = declared_length(scope)
        if declared is not None and declared > limit:
            await refuse(send, limit)  # without reading a byte of the body
            return
        if not upload:
            # Uploads stream to disk, and Gradio's parser checks each file as it arrives and
            # deletes what it wrote when refusing; an error raised from here mid-upload would
            # leave its temporary file behind.
            receive = counting(receive, limit)
        await self.app(scope, receive, send)


def declared_length(scope: Scope) -> int | None:
    """The Content-Length header as a number; None when absent or unreadable (chunked)."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def counting(receive: Receive, limit: int) -> Receive:
    """`receive` that raises BodyTooLarge once more than `limit` body bytes have arrived:
    catches bodies without a Content-Length (chunked) or with a false one."""
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge(limit)
        return message

    return wrapped


async def refuse(send: Send, limit: int) -> None:
    # JSON, as every error of the inference API is (the page ignores the body of a 413).
    body = json.dumps({"error": BodyTooLarge(limit).detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
