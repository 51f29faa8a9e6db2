"""``d2mtl serve``: the one-pass face analysis of ``d2mtl predict`` behind a KServe model server.

``FaceAnalysisModel`` is a ``kserve.Model``; ``serve()`` runs it with ``kserve.ModelServer`` (REST only), which
provides the endpoints of both KServe protocols:

    POST /v1/models/<name>:predict   {"instances": [{"image_bytes": {"b64": "<base64 image>"}}, ...]}
                                     -> {"predictions": [<image result>, ...]}, one per instance, in order
    POST /v2/models/<name>/infer     one BYTES input, each element a base64 image
                                     -> one BYTES output "results", each element an image result as JSON text
    GET  /v1/models/<name>, /v2/health/live, /v2/health/ready, /v2/models/<name>, /v2/models/<name>/ready

An image result is exactly a line of ``d2mtl predict --format json`` (``predict.ImageResult``); docs/serving.md
describes it. A request fails as a whole, 4xx with ``{"error": "<one line>"}``, when it is malformed or one of its
images cannot be decoded; an image without a face is an ``ok`` answer with status ``no_face``. The request body
limit is enforced before the body is read (``BodyLimit``). ``GET /ui`` serves a page to try the model in a browser.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

import kserve
import torch
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from kserve.errors import InvalidInput
from kserve.model_server import app
from starlette.exceptions import HTTPException

from d2mtl import export
from d2mtl.config.ingest import IngestConfig
from d2mtl.contracts import ModelCard
from d2mtl.errors import UserError
from d2mtl.inference import InferenceModel
from d2mtl.predict import Analyzer, ImageResult

log = logging.getLogger(__name__)

DEFAULT_NAME = "d2mtl"
DEFAULT_PORT = 8080
DEFAULT_MAX_REQUEST_MB = 16.0
PAGE_PATH = "/ui"
V2_OUTPUT = "results"
BACKENDS = ("auto", "torch", "onnx")  # auto: onnxruntime on CPU, torch on a GPU


class ImageError(InvalidInput):
    """An instance that is not a decodable image: the whole request is refused with 400."""


# ---- requests ----------------------------------------------------------------------------------


def decode_base64(text: Any, where: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidInput(f"{where}: expected a base64 string, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidInput(f"{where}: not valid base64 ({err})") from None
    if not data:
        raise InvalidInput(f"{where}: empty image")
    return data


def v1_images(payload: Any) -> list[bytes]:
    """The images of a v1 ``{"instances": [...]}`` body; an instance is ``{"image_bytes": {"b64": ...}}`` (the
    TensorFlow Serving convention) or ``{"b64": ...}``. KServe leaves a body sent without a JSON content type as
    bytes: it is read as JSON all the same."""
    if isinstance(payload, bytes):
        try:
            payload = json.loads(payload)
        except ValueError as err:
            raise InvalidInput(f"the body is not JSON ({err})") from None
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not instances:
        raise InvalidInput(
            'expected {"instances": [{"image_bytes": {"b64": "<base64 image>"}}, ...]} with at least one instance'
        )
    images = []
    for number, instance in enumerate(instances):
        where = f"instances[{number}]"
        holder = instance.get("image_bytes", instance) if isinstance(instance, dict) else None
        if not isinstance(holder, dict) or "b64" not in holder:
            raise InvalidInput(f'{where}: expected {{"image_bytes": {{"b64": "<base64 image>"}}}}')
        images.append(decode_base64(holder["b64"], where))
    return images


def v2_images(request: kserve.InferRequest) -> list[bytes]:
    """The images of a v2 request: its one BYTES input, each element base64 text."""
    if len(request.inputs) != 1 or request.inputs[0].datatype != "BYTES":
        found = ", ".join(f"{i.name} ({i.datatype})" for i in request.inputs) or "none"
        raise InvalidInput(f"expected one BYTES input of base64 images; got {found}")
    data = request.inputs[0].data
    if not isinstance(data, list) or not data:
        raise InvalidInput(f"input {request.inputs[0].name}: expected a non-empty list of base64 images")
    return [decode_base64(item, f"{request.inputs[0].name}[{number}]") for number, item in enumerate(data)]


# ---- the model ---------------------------------------------------------------------------------


class OnnxGraph:
    """``InferenceModel`` exported to ONNX (as ``d2mtl export`` does) and run by onnxruntime, called like it: a
    batch of normalised faces in, its named outputs out. On CPU ~10x faster than torch at batch 1 and ~2x at
    batch 16 here (bench/serve_bench.py)."""

    def __init__(self, graph: InferenceModel, card: ModelCard, threads: int):
        import onnxruntime as ort

        size = card.input_size
        example = torch.randn(export.TRACE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model = export.onnx_bytes(graph, example, export.export_card(card, graph, "onnx", "d2mtl serve"))
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.output_names = graph.output_names

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.session.run(list(self.output_names), {export.INPUT_NAME: x.contiguous().numpy()})
        return tuple(torch.from_numpy(output) for output in outputs)


def load_analyzer(
    model_uri: str,
    device: str = "auto",
    ingest: IngestConfig | None = None,
    batch_size: int = 64,
    backend: str = "auto",
) -> Analyzer:
    """``Analyzer`` whose forward pass runs on ``backend`` (see ``BACKENDS``)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    analyzer = Analyzer(model_uri, device=device, ingest=ingest, batch_size=batch_size)
    on_cpu = analyzer.device.type == "cpu"
    if backend == "onnx" and not on_cpu:
        raise UserError(f"backend onnx runs on the CPU; the model is on {analyzer.device} (pass --device cpu)")
    if backend == "onnx" or (backend == "auto" and on_cpu):
        analyzer.graph = OnnxGraph(analyzer.graph, analyzer.card, torch.get_num_threads())
    return analyzer


class FaceAnalysisModel(kserve.Model):
    """Faces, age, gender, race and expression of each image, with ``predict.Analyzer``.

    One analysis runs at a time, in a worker thread (the event loop stays free for health checks and uploads;
    the network and the detector already use every core given to them)."""

    def __init__(
        self,
        name: str,
        model_uri: str,
        device: str = "auto",
        ingest: IngestConfig | None = None,
        batch_size: int = 64,
        backend: str = "auto",
    ):
        super().__init__(name)
        self.settings = {
            "model_uri": model_uri,
            "device": device,
            "ingest": ingest,
            "batch_size": batch_size,
            "backend": backend,
        }
        self.analyzer: Analyzer | None = None
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2mtl-analyze")

    def load(self) -> bool:
        self.analyzer = load_analyzer(**self.settings)
        self.ready = True
        return self.ready

    def analyze(self, images: list[bytes]) -> list[ImageResult]:
        """Results in input order; an image that cannot be decoded refuses the request before any forward pass."""
        located = [self.analyzer.locate(image, number) for number, image in enumerate(images)]
        for number, item in enumerate(located):
            if item.result.status == "unreadable":
                raise ImageError(f"image {number}: not a decodable image ({item.result.reason})")
        return list(self.analyzer.attach(located))

    async def predict(self, payload: dict | kserve.InferRequest, headers: dict[str, str] | None = None):
        is_v2 = isinstance(payload, kserve.InferRequest)
        images = v2_images(payload) if is_v2 else v1_images(payload)
        results = await asyncio.get_running_loop().run_in_executor(self.worker, self.analyze, images)
        if not is_v2:
            return {"predictions": [result.model_dump(mode="json") for result in results]}
        output = kserve.InferOutput(
            name=V2_OUTPUT,
            shape=[len(results)],
            datatype="BYTES",
            data=[result.model_dump_json() for result in results],
        )
        return kserve.InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[output])

    def get_input_types(self) -> list[dict]:
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": V2_OUTPUT, "datatype": "BYTES", "shape": [-1]}]

    def stop(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
        super().stop()


# ---- the HTTP layer around KServe's -------------------------------------------------------------


def error_response(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": reason}, headers=headers)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before it is read (by its Content-Length), or
    as soon as it grows past the limit (a chunked body); nothing of it is decoded."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def refusal(self) -> JSONResponse:
        return error_response(413, f"request body over the limit of {self.max_bytes / 1e6:g} MB")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await error_response(400, "Content-Length is not a number")(scope, receive, send)
            if int(length) > self.max_bytes:
                return await self.refusal()(scope, receive, send)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.refusal()(scope, receive, send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        async def replay():
            nonlocal body
            message, body = {"type": "http.request", "body": body, "more_body": False}, b""
            return message

        return await self.app(scope, replay, send)


class NoBinaryExtension:
    """ASGI middleware: a v2 request in the binary data extension (``Inference-Header-Content-Length``) gets 400.
    KServe 0.21 decodes its BYTES as UTF-8 text, so an image fails with a 500 whose message quotes the image."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and any(name == b"inference-header-content-length" for name, _ in scope["headers"]):
            reason = "the binary data extension is not supported: send the images as base64 text in a JSON request"
            return await error_response(400, reason)(scope, receive, send)
        return await self.app(scope, receive, send)


def page() -> str:
    return resources.files("d2mtl").joinpath("static", "index.html").read_text(encoding="utf-8")


async def http_error(_, err: HTTPException) -> JSONResponse:
    """FastAPI's own refusals (a body it cannot parse, an unknown path) in KServe's ``{"error": ...}`` shape."""
    return error_response(err.status_code, str(err.detail), err.headers)


async def one_line_validation_error(_, err: RequestValidationError) -> JSONResponse:
    """FastAPI's answer to a body that is not a v2 request is a list of dicts; this is one line."""
    problems = [
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in err.errors()
    ]
    return error_response(400, "invalid request: " + "; ".join(problems[:3]))


def configure_app(max_request_bytes: int) -> None:
    """Our additions to KServe's FastAPI app: the body limit, one-line errors, the page."""
    app.add_middleware(NoBinaryExtension)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_exception_handler(RequestValidationError, one_line_validation_error)
    app.add_exception_handler(HTTPException, http_error)
    html = page()
    app.add_api_route(PAGE_PATH, lambda: HTMLResponse(html), methods=["GET"], include_in_schema=False)


def serve(
    model_uri: str,
    name: str = DEFAULT_NAME,
    port: int = DEFAULT_PORT,
    device: str = "auto",
    ingest: IngestConfig | None = None,
    batch_size: int = 64,
    backend: str = "auto",
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
) -> None:
    """Load the model (a UserError if it is not a model folder), then serve it until SIGTERM / SIGINT."""
    if not 0 < port < 65536:
        raise UserError(f"port {port} must be between 1 and 65535")
    if not max_request_mb > 0:
        raise UserError(f"the request size limit {max_request_mb} MB must be above 0")
    model = FaceAnalysisModel(name, model_uri, device=device, ingest=ingest, batch_size=batch_size, backend=backend)
    model.load()
    configure_app(int(max_request_mb * 1e6))
    log.info(
        "serving %s as %r on port %d (forward pass: %s): POST /v1/models/%s:predict, "
        "POST /v2/models/%s/infer, page at %s",
        model_uri,
        name,
        port,
        type(model.analyzer.graph).__name__,
        name,
        name,
        PAGE_PATH,
    )
    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start([model])
