"""The FastAPI app (routes, API key, error envelope) and ``run_server``, which serves it with uvicorn.

The engine process starts in the app's lifespan; the app answers ``/health`` with 503 until every rank is
ready, and for good after any of them dies. If the engine cannot start, the server prints one line and
``run_server`` returns 1.
"""

from __future__ import annotations

import hmac
import logging
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.entrypoints.args import ServerArgs
from server.entrypoints.metrics import ServerMetrics
from server.entrypoints.protocol import APIError
from server.entrypoints.serving import OpenAIServing
from server.entrypoints.tokenizer_manager import TokenizerManager

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 3
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(args: ServerArgs) -> FastAPI:
    """The app; its lifespan starts and stops the engine. ``app.state.exit_code`` is 1 if the engine failed."""
    metrics = ServerMetrics()
    tm = TokenizerManager(args, metrics)
    serving = OpenAIServing(tm, args.served_model_name)

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

    @app.post("/generate", dependencies=auth)
    async def generate(request: Request) -> Response:
        return await serving.generate(request)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        card = {"id": args.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "server",
                "max_model_len": tm.max_model_len or None, "vocab_size": tm.vocab_size or None}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> JSONResponse:
        if tm.healthy:
            return JSONResponse({"status": "ok"})
        status = "loading" if tm.dead_reason is None else "failed"
        return JSONResponse({"status": status, "reason": tm.dead_reason}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    return app


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _ignore_signal(signum: int, frame: object) -> None:
    pass


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
    server = uvicorn.Server(config)
    app.state.uvicorn_server = server
    # uvicorn handles SIGINT/SIGTERM while it runs and re-raises the signal once it has shut down; by then
    # everything is stopped in order, so the re-raised signal is ignored and the process exits normally.
    signal.signal(signal.SIGINT, _ignore_signal)
    signal.signal(signal.SIGTERM, _ignore_signal)
    logger.info("listening on http://%s:%d", *sock.getsockname()[:2])
    server.run(sockets=[sock])
    return app.state.exit_code
