"""The FastAPI app (routes, API key, error envelope) and ``run_server``, which serves it with uvicorn.

The engine process starts in the app's lifespan; the app answers ``/health`` with 503 until every rank is
ready, and for good after any of them dies. If the engine cannot start, the server prints one line and
``run_server`` returns 1.

Shutdown (SIGTERM/SIGINT): new requests get 503 at once, requests in flight get ``--shutdown-grace-period``
seconds to finish, then the rest end with an error (a stream gets an error event and ``[DONE]``), the engine and
its workers stop, and the process exits 0; a second signal skips the grace period (and with nothing in flight
there is none to wait for). Request bodies larger than ``--max-request-bytes`` are answered 413 without being read
whole.

``--api-key`` guards every route that touches the model or the engine; ``/health`` and ``/metrics`` (probes and
scrapers) and the API's own description (``/docs``, ``/redoc``, ``/openapi.json``) stay open. With
``--allowed-origins``, starlette's CORS middleware answers browsers' preflights (``OPTIONS``, never behind the key).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from server.entrypoints.args import ServerArgs
from server.entrypoints.metrics import CONTENT_TYPE, ServerMetrics
from server.entrypoints.native import NativeServing
from server.entrypoints.protocol import (
    APIError,
    StartProfileRequest,
    bad_request,
    model_not_found,
    parse_body,
    parse_json_object,
)
from server.entrypoints.reasoning_parsers import reasoning_parser_class
from server.entrypoints.responses import ResponsesServing
from server.entrypoints.serving import OpenAIServing
from server.entrypoints.streaming import CLIENT_CLOSED_REQUEST
from server.entrypoints.tokenize import TokenizeServing
from server.entrypoints.tokenizer_manager import SHUTTING_DOWN, TokenizerManager

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 3
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes (--max-request-bytes).",
                    code="request_too_large")


class BodySizeLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, from its Content-Length or, for a chunked body, as
    soon as the bytes received pass the limit (the handler's read raises an ``APIError``); 415 for a compressed
    body (``Content-Encoding`` other than ``identity``)."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await error_response(_too_large(self.limit))(scope, receive, send)
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"", b"identity"):  # a compressed body would be read as JSON text: refuse it
            return await error_response(APIError(
                415, f"Content-Encoding {encoding.decode('latin-1')!r} is not supported: send the body uncompressed.",
                code="unsupported_content_encoding"))(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _too_large(self.limit)
            return message

        await self.app(scope, limited_receive, send)


def invocation_kind(body: dict) -> str:
    """Which endpoint a ``/invocations`` body is for: ``messages`` is chat, ``prompt`` completions, ``input``
    responses, ``text`` or ``input_ids`` SGLang's ``/generate``; anything else is a 400."""
    for field, kind in (("messages", "chat"), ("prompt", "completions"), ("input", "responses"),
                        ("text", "generate"), ("input_ids", "generate")):
        if field in body:
            return kind
    raise bad_request("The /invocations body matches no endpoint: send 'messages' (chat completions), 'prompt' "
                      "(completions), 'input' (responses), or 'text' / 'input_ids' (/generate).", code="invalid_body")


def build_app(args: ServerArgs) -> FastAPI:
    """The app; its lifespan starts and stops the engine. ``app.state.exit_code`` is 1 if the engine failed."""
    metrics = ServerMetrics()
    tm = TokenizerManager(args, metrics)
    name = args.served_model_name
    serving = OpenAIServing(tm, name)
    reasoning = reasoning_parser_class(args.reasoning_parser) if args.reasoning_parser else None
    native, responses, tokenize = (NativeServing(tm, name), ResponsesServing(tm, name, reasoning),
                                   TokenizeServing(tm, name))

    def on_fatal(message: str) -> None:
        print(f"launch_server.py: error: {message}", file=sys.stderr, flush=True)
        app.state.exit_code = 1
        if app.state.uvicorn_server is not None:
            app.state.uvicorn_server.should_exit = True

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await tm.start(on_fatal)
        try:
            yield
        finally:
            await tm.shutdown()

    app = FastAPI(title="LLM server (OpenAI-compatible)", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, limit=args.max_request_bytes)
    if args.allowed_origins:  # added last, so outermost: a preflight is answered before any other check
        app.add_middleware(CORSMiddleware, allow_origins=list(args.allowed_origins),
                           allow_methods=list(args.allowed_methods), allow_headers=list(args.allowed_headers),
                           allow_credentials=args.allow_credentials)
    app.state.exit_code = 0
    app.state.uvicorn_server = None
    app.state.tokenizer_manager = tm

    def require_api_key(request: Request) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if args.api_key is not None and not (
            scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), args.api_key.encode())
        ):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    auth = [Depends(require_api_key)]

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = HTTP_ERROR_CODES.get(e.status_code)
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                       code=code, headers=dict(e.headers or {})))

    @app.exception_handler(ClientDisconnect)
    async def on_client_disconnect(request: Request, e: ClientDisconnect) -> Response:
        # the client left while its body was being read: nothing was accepted, no one reads an answer
        logger.debug("client left during %s %s before its body arrived", request.method, request.url.path)
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"Internal server error: {type(e).__name__}: {e}", type="server_error"))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        return await serving.completions(request)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        return await serving.chat(request)

    @app.post("/v1/responses", dependencies=auth)
    async def create_response(request: Request) -> Response:
        return await responses.create(request)

    @app.get("/v1/responses/{response_id}", dependencies=auth)
    async def retrieve_response(response_id: str) -> dict:
        return responses.retrieve(response_id)

    @app.post("/generate", dependencies=auth)
    async def generate(request: Request) -> Response:
        return await native.generate(request)

    @app.post("/invocations", dependencies=auth)
    async def invocations(request: Request) -> Response:
        """SageMaker's route: the body's shape picks the endpoint, as vLLM and SGLang dispatch it."""
        kind = invocation_kind(parse_json_object(await request.body()))
        handler = {"chat": serving.chat, "completions": serving.completions, "generate": native.generate,
                   "responses": responses.create}[kind]
        return await handler(request)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize_prompt(request: Request) -> dict:
        return await tokenize.tokenize(request)

    @app.post("/detokenize", dependencies=auth)
    async def detokenize_tokens(request: Request) -> dict:
        return await tokenize.detokenize(request)

    def model_card() -> dict:
        # root: the checkpoint the served name stands for, parent: the base model of an adapter (vLLM's fields)
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "server",
                "root": args.engine.model_path or name, "parent": None,
                "max_model_len": tm.max_model_len or None, "vocab_size": tm.vocab_size or None}

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def retrieve_model(model_id: str) -> dict:
        if model_id != name:
            raise model_not_found(model_id, name)
        return model_card()

    @app.post("/flush_cache", dependencies=auth)
    async def flush_cache() -> dict:
        """Drop the prefix cache's entries that no running request uses."""
        return {"flushed_entries": await tm.flush_cache()}

    @app.post("/start_profile", dependencies=auth)
    async def start_profile(request: Request) -> dict:
        """Start torch.profiler on every rank (the server needs --profile-dir); optional body
        ``{"record_shapes": bool, "num_steps": int}``."""
        raw = await request.body()
        body = parse_body(raw, StartProfileRequest) if raw.strip() else StartProfileRequest()
        reply = await tm.control_profile(True, body.record_shapes, body.num_steps)
        if reply.error:
            raise bad_request(reply.error)
        return {"status": "started", "output_dir": reply.output_dir}

    @app.post("/stop_profile", dependencies=auth)
    async def stop_profile() -> dict:
        """Stop every rank's profiler: each writes its Chrome trace and op table; their paths and times by rank
        (after a start with ``num_steps``, the profile that stopped by itself, once)."""
        reply = await tm.control_profile(False)
        if reply.error:
            raise bad_request(reply.error)
        return {"status": "stopped", "ranks": reply.ranks}

    @app.get("/ping")  # SageMaker's health check, beside /invocations
    @app.get("/health")
    async def health() -> JSONResponse:
        if tm.healthy:
            return JSONResponse({"status": "ok"})
        if tm.dead_reason is not None:
            return JSONResponse({"status": "failed", "reason": tm.dead_reason}, status_code=503)
        status = "shutting_down" if tm.draining else "loading"
        return JSONResponse({"status": status, "reason": None}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _ignore_signal(signum: int, frame: object) -> None:
    pass


class DrainingServer(uvicorn.Server):
    """uvicorn, whose first SIGTERM/SIGINT starts a drain (:meth:`drain`) instead of closing connections at once;
    a second signal, or the end of the drain, shuts down."""

    def __init__(self, config: uvicorn.Config, tm: TokenizerManager, grace_s: float):
        super().__init__(config)
        self.tm = tm
        self.grace_s = grace_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: bool | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain_task is not None or self.loop is None or self.should_exit:
            return super().handle_exit(sig, frame)
        name = signal.Signals(sig).name
        self._drain_task = True  # set at once: a second signal arriving before the task starts skips the drain
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.drain(name)))

    async def drain(self, signame: str) -> None:
        tm = self.tm
        logger.info("%s: shutting down; %d request(s) in flight get up to %g s to finish", signame,
                    tm.num_in_flight, self.grace_s)
        tm.draining = True
        deadline = time.monotonic() + self.grace_s
        while tm.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if tm.num_in_flight:
            tm.fail_in_flight(SHUTTING_DOWN)
            await asyncio.sleep(0.2)  # let the streams write their error event and [DONE]
        self.should_exit = True


def run_server(args: ServerArgs) -> int:
    """Serve until SIGINT/SIGTERM (returns 0) or until the engine fails to start (returns 1)."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sock = _bind(args.host, args.port)
    except OSError as e:
        print(f"launch_server.py: error: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    app = build_app(args)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "debug",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = DrainingServer(config, app.state.tokenizer_manager, args.shutdown_grace_period)
    app.state.uvicorn_server = server
    # uvicorn handles SIGINT/SIGTERM while it runs and re-raises the signal once it has shut down; by then
    # everything is stopped in order, so the re-raised signal is ignored and the process exits normally.
    signal.signal(signal.SIGINT, _ignore_signal)
    signal.signal(signal.SIGTERM, _ignore_signal)
    logger.info("listening on http://%s:%d", *sock.getsockname()[:2])
    server.run(sockets=[sock])
    return app.state.exit_code
