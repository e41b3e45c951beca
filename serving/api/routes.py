"""The HTTP API beside the page, in the same server: the Open Inference Protocol (v2) that
tritonclient and KServe's clients speak, `POST /classify` for people with curl, health and
Prometheus metrics.

    GET  /v2/health/live   /v2/health/ready                 (no password: probes)
    GET  /v2   /v2/models   /v2/models/{name}[/versions/1][/ready | /config]
    POST /v2/models/{name}[/versions/1]/infer                tensors in, tensors out
    POST /classify?model=&top_k=                             an image in, the page's answer out
    GET  /metrics

A model's name is its catalog key (what the page's picker uses, `cifar10-resnet10`) or its
name in the Triton repository `toolkit export --triton` writes (`cifar10_resnet10`), so client
code written against either server works against the other unchanged. Every refusal is a 4xx
with `{"error": "..."}` naming the problem (the protocol's error shape; tritonclient shows
the message); with --auth every route but the health probes needs HTTP Basic credentials.
Backpressure: at most `max_in_flight` inference requests are read, queued or computed at
once; past that the answer is 503 with Retry-After, at once, instead of a queue that grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.answer import classify
from serving.api.guards import Gate, authorized, check_encoding, media_type, top_k, unsupported
from serving.api.metrics import ERROR_STATE, MODEL_STATE, STATUS_KINDS, Metrics, MetricsMiddleware
from serving.api.oip import HEADER_LENGTH, VERSION, ModelSpec, RequestError, server_metadata
from serving.api.oip_infer import encode_response, parse_infer
from serving.catalog import Catalog, ServedModel
from serving.limits import MULTIPART_SLACK, BodyLimit
from serving.uploads import ImageError

# Inference requests in progress at once, whatever their stage; a few per core is enough to
# keep the CPU busy while others are being read or written.
DEFAULT_MAX_IN_FLIGHT = 16
# Threads that decode and run models: onnxruntime releases the GIL while it computes, so a few
# run side by side; more would only oversubscribe the cores.
WORKERS = 4
# What the metrics record for a client that left before its answer (nginx's convention).
CLIENT_CLOSED = 499
INFER_TYPES = ("", "application/json", "application/octet-stream")
UPLOAD_TYPES = "multipart/form-data, image/* or application/octet-stream"
MODEL_PATH = "/v2/models/{name}"
VERSION_PATH = "/v2/models/{name}/versions/{version}"
INFER_PATH = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer")
CLASSIFY_PATH = "/classify"

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Entry:
    """A model as the API serves it: the catalog's model and its protocol description."""

    served: ServedModel
    spec: ModelSpec


class InferenceApi:
    """The API's routes and middleware for one catalog; `launch` hands them to the server
    that also serves the page."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        max_upload_bytes: int,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        workers: int = WORKERS,
    ):
        self.catalog = catalog
        self.max_upload_bytes = max_upload_bytes
        self.entries: dict[str, Entry] = {}
        for key, served in catalog.models.items():
            entry = Entry(served, ModelSpec.of(key, served.classifier))
            for name in entry.spec.names:
                self.entries.setdefault(name, entry)
        self.metrics = Metrics()
        self.gate = Gate(max_in_flight, self.metrics)
        self.workers = workers
        self.pool: ThreadPoolExecutor | None = None  # one per server run: see lifespan
        self.version = _version()

    # --- assembly ----------------------------------------------------------------------------

    def app_kwargs(self, auth: tuple[str, str] | None) -> dict[str, Any]:
        """What the page's FastAPI app is built with: these routes (matched before Gradio's),
        the metrics outside the body caps, the caps outside everything else of ours."""
        routes = self.routes(auth)
        infer_limit = max(e.spec.body_limit() for e in self.entries.values())
        limits = [
            (INFER_PATH, infer_limit),
            (re.compile(re.escape(CLASSIFY_PATH)), self.max_upload_bytes + MULTIPART_SLACK),
        ]
        return {
            "routes": routes,
            "lifespan": self.lifespan,
            "middleware": [
                Middleware(MetricsMiddleware, metrics=self.metrics, routes=routes),
                Middleware(BodyLimit, max_upload_bytes=self.max_upload_bytes, limits=limits),
            ],
        }

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """The inference threads live as long as the server: a closed server leaves none."""
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="inference")
        try:
            yield
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def routes(self, auth: tuple[str, str] | None) -> list[Route]:
        def get(path: str, handler: Handler, protected: bool = True) -> Route:
            return Route(path, self.endpoint(handler, auth, protected=protected), methods=["GET"])

        def post(path: str, handler: Handler) -> Route:  # inference: bounded, always protected
            return Route(path, self.endpoint(handler, auth, bounded=True), methods=["POST"])

        routes = [
            get("/v2/health/live", self.live, protected=False),
            get("/v2/health/ready", self.ready, protected=False),
            get("/v2", self.server),
            get("/v2/models", self.list_models),
            get("/metrics", self.render_metrics),
            post(CLASSIFY_PATH, self.classify),
        ]
        for base in (MODEL_PATH, VERSION_PATH):
            routes += [
                get(base, self.model_metadata),
                get(f"{base}/ready", self.model_ready),
                get(f"{base}/config", self.model_config),
                post(f"{base}/infer", self.infer),
            ]
        return routes

    def endpoint(
        self,
        handler: Handler,
        auth: tuple[str, str] | None,
        *,
        protected: bool = True,
        bounded: bool = False,
    ) -> Handler:
        """`handler` behind the password and the in-flight bound, its refusals as JSON."""

        async def answer(request: Request) -> Response:
            try:
                if protected and auth and not authorized(request, auth):
                    raise RequestError(
                        "this server needs a user name and password (HTTP Basic)",
                        status=401,
                        kind="unauthorized",
                        headers={"WWW-Authenticate": 'Basic realm="toolkit"'},
                    )
                if not bounded:
                    return await handler(request)
                with self.gate:
                    return await handler(request)
            except RequestError as exc:
                return refusal(request, exc)
            except HTTPException as exc:  # the body cap mid-stream, a malformed multipart body
                kind = STATUS_KINDS.get(exc.status_code, "bad_request")
                return refusal(request, RequestError(str(exc.detail), exc.status_code, kind))
            except ClientDisconnect:  # gone mid-body: nobody to answer, nothing went wrong here
                setattr(request.state, ERROR_STATE, "client_disconnected")
                return Response(status_code=CLIENT_CLOSED)

        return answer

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` on an inference thread: decoding and models never stall the event loop
        (which also serves the page)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def lookup(self, request: Request, name: str | None) -> Entry:
        """The model a request names (None: the page's default), recorded for the metrics."""
        entry = self.entries.get(name or self.catalog.default)
        if entry is None:
            known = ", ".join(" or ".join(e.spec.names) for e in self.unique())
            raise RequestError(
                f"unknown model {str(name)[:80]!r}; this server has {known}",
                status=404,
                kind="unknown_model",
            )
        setattr(request.state, MODEL_STATE, entry.spec.key)
        version = request.path_params.get("version")
        if version is not None and version != VERSION:
            raise RequestError(
                f"model {name[:80]!r} has only version {VERSION}, not {version[:20]!r}",
                status=404,
                kind="unknown_version",
            )
        return entry

    def unique(self) -> list[Entry]:
        return list({id(e): e for e in self.entries.values()}.values())

    # --- health and metadata -----------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        # The port opens only after every model has loaded and run a blank image (catalog
        # and OnnxClassifier check that at startup), so whoever can ask gets "ready".
        models = [e.spec.key for e in self.unique()]
        return JSONResponse({"ready": bool(models), "models": models}, 200 if models else 503)

    async def server(self, request: Request) -> Response:
        return JSONResponse(server_metadata(self.version))

    async def list_models(self, request: Request) -> Response:
        """Not part of the protocol: every model with the names it answers to."""
        models = [
            {
                "name": e.spec.key,
                "names": list(e.spec.names),
                "versions": [VERSION],
                "ready": True,
                "default": e.spec.key == self.catalog.default,
            }
            for e in self.unique()
        ]
        return JSONResponse({"models": models})

    async def model_metadata(self, request: Request) -> Response:
        name = request.path_params["name"]
        return JSONResponse(self.lookup(request, name).spec.metadata(name))

    async def model_ready(self, request: Request) -> Response:
        name = request.path_params["name"]
        self.lookup(request, name)
        return JSONResponse({"name": name, "ready": True})

    async def model_config(self, request: Request) -> Response:
        name = request.path_params["name"]
        return JSONResponse(self.lookup(request, name).spec.config(name))

    async def render_metrics(self, request: Request) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    # --- inference ---------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        name = request.path_params["name"]
        entry = self.lookup(request, name)
        media = media_type(request)
        if media not in INFER_TYPES:
            raise unsupported(media, "application/json (or application/octet-stream)")
        check_encoding(request)
        body = await request.body()
        header_length = request.headers.get(HEADER_LENGTH)
        answer, json_length = await self.run(self.infer_now, entry, name, body, header_length)
        if json_length is None:
            return Response(answer, media_type="application/json")
        return Response(
            answer,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(json_length)},
        )

    def infer_now(
        self, entry: Entry, name: str, body: bytes, header_length: str | None
    ) -> tuple[bytes, int | None]:
        request = parse_infer(body, header_length, entry.spec)
        names = [o.name for o in request.outputs]
        results = entry.served.classifier.run_outputs(request.images, names)
        self.metrics.images.labels(entry.spec.key).inc(len(request.images))
        return encode_response(name, request, results, entry.spec.classes)

    async def classify(self, request: Request) -> Response:
        """An image file -> the page's answer: the same decode, crop, resize and "not sure"."""
        media = media_type(request)
        check_encoding(request)
        model = request.query_params.get("model")
        if media == "multipart/form-data":
            async with request.form(max_files=1, max_fields=8) as form:
                upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
                if upload is None:
                    raise RequestError(
                        "the form has no file; send the image as a file field "
                        "(curl -F image=@cat.png)",
                        kind="no_image",
                    )
                data = await upload.read()
                name = f"'{upload.filename}'" if upload.filename else "the upload"
                field = form.get("model")
                model = model or (field if isinstance(field, str) else None)
        elif media.startswith("image/") or media == "application/octet-stream":
            data, name = await request.body(), "the upload"
        else:
            raise unsupported(media, UPLOAD_TYPES)
        entry = self.lookup(request, model)
        k = top_k(request.query_params.get("top_k"), len(entry.spec.classes))
        try:
            label, timing = await self.run(classify, entry.served, data, name, k)
        except ImageError as exc:
            raise RequestError(str(exc), kind="bad_image") from None
        self.metrics.images.labels(entry.spec.key).inc()
        return JSONResponse(
            {
                "model": entry.spec.key,
                **label,
                "preprocess_ms": round(timing["preprocess_ms"], 3),
                "model_ms": round(timing["model_ms"], 3),
            }
        )


def refusal(request: Request, error: RequestError) -> Response:
    setattr(request.state, ERROR_STATE, error.kind)
    return JSONResponse({"error": str(error)}, error.status, headers=error.headers)


def _version() -> str:
    try:
        return importlib.metadata.version("toolkit")
    except importlib.metadata.PackageNotFoundError:  # the Docker image ships serving/ alone
        return "unknown"
