"""The engine process: builds the Engine (rank 0, which starts ranks 1..W-1) and serves it over zmq.

It PULLs ``GenerateRequest`` / ``AbortRequest`` from the HTTP process and PUSHes back, after every step, one
``EngineOutputs`` (new tokens, rejections, stats). The first message it sends is ``EngineReady`` (every rank is
up) or ``EngineStartFailed``; an exception in the serving loop is reported as ``EngineCrashed`` before exiting.

A watchdog thread watches every step: one that has not completed after ``--watchdog-timeout`` seconds (a hung or
stopped worker, a collective that never returns) is reported as ``EngineStalled``; the HTTP side then fails the
requests in flight, marks itself unhealthy and ends the engine's processes. A request the engine refuses, or whose
admission raises unexpectedly, is rejected alone; the loop goes on.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

import zmq

from server.config import EngineConfig
from server.execution.procutil import die_with_parent
from server.messages import (
    AbortRequest,
    CacheFlushed,
    EngineStats,
    FlushCache,
    GenerateRequest,
    ProfileControl,
    ProfileReply,
    RequestOutput,
)

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000


@dataclass
class EngineReady:
    pid: int
    worker_pids: list[int]  # this node's ranks 1.. (other nodes watch their own)
    tokenizer_path: str
    max_model_len: int


@dataclass
class EngineStartFailed:
    message: str  # one line for the user
    traceback: str


@dataclass
class EngineCrashed:
    message: str
    traceback: str


@dataclass
class EngineStalled:
    message: str


@dataclass
class Rejection:
    rid: str
    message: str
    code: str


@dataclass
class EngineOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    stats: EngineStats = field(default_factory=EngineStats)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)  # unwinds through the `finally` that shuts the engine (and its workers) down


class StepWatchdog:
    """Reports a step that runs longer than ``timeout_s`` (once) over its own zmq socket: the serving loop's
    socket is not thread-safe, and the loop itself is what is stuck."""

    def __init__(self, ctx: zmq.Context, outputs_addr: str, timeout_s: float):
        self.timeout_s = timeout_s
        self.step_started: float | None = None  # set by the serving loop around every step
        self._sock = ctx.socket(zmq.PUSH)
        self._sock.connect(outputs_addr)
        threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            started = self.step_started
            if started is not None and time.monotonic() - started > self.timeout_s:
                message = (f"an engine step did not complete within {self.timeout_s:g} s (--watchdog-timeout); "
                           "a worker is hung or stopped")
                logger.error(message)
                self._sock.send_pyobj(EngineStalled(message))
                return


def run_engine_process(config: EngineConfig, requests_addr: str, outputs_addr: str, log_level: str,
                       watchdog_timeout_s: float = 300.0) -> None:
    """Entry point of the spawned engine process."""
    die_with_parent()
    # Its own process group: the workers the Engine starts join it, so the server can end them all at once,
    # and a Ctrl-C in the terminal reaches only the server, which then shuts the engine down in order.
    os.setpgrp()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s engine: %(message)s")

    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.connect(outputs_addr)
    inp = ctx.socket(zmq.PULL)
    inp.connect(requests_addr)
    try:
        engine = _start_engine(config, log_level)
    except Exception as e:
        out.send_pyobj(EngineStartFailed(f"{type(e).__name__}: {e}".splitlines()[0], traceback.format_exc()))
        out.close(linger=2000)
        sys.exit(1)
    stopped = False
    try:
        out.send_pyobj(EngineReady(os.getpid(), list(engine.worker_pids()), engine.tokenizer_path,
                                   engine.max_model_len))
        serve_engine(engine, inp, out, StepWatchdog(ctx, outputs_addr, watchdog_timeout_s))
    except SystemExit:  # SIGTERM: the server is shutting down
        stopped = True
    except Exception as e:
        logger.exception("engine loop failed")
        out.send_pyobj(EngineCrashed(f"{type(e).__name__}: {e}", traceback.format_exc()))
        sys.exit(1)
    finally:
        engine.shutdown()
        out.close(linger=2000)
        inp.close(linger=0)
    if stopped:  # everything is stopped: skip the interpreter's teardown of torch (about a second), nothing needs it
        logging.shutdown()
        os._exit(0)


def _start_engine(config: EngineConfig, log_level: str):
    """Build the Engine, logging where the model comes from and how long each stage took (the built-in model
    is generated on first use, which takes a while and logs its own stages)."""
    from server.engine.engine import Engine
    from server.models.builtin import builtin_model_path

    start = time.monotonic()
    path = config.model_path or builtin_model_path()
    ranks = config.sp_size * config.tp_size
    logger.info("loading the model from %s on %d rank(s) (%s)", path, ranks,
                "the built-in model" if config.model_path is None else f"load format {config.load_format}")
    loaded = time.monotonic()
    engine = Engine(config, log_level=log_level.upper())
    logger.info("model loaded and caches allocated in %.1f s (%.1f s since the engine process started)",
                time.monotonic() - loaded, time.monotonic() - start)
    return engine


def control_profile(engine, msg: ProfileControl) -> ProfileReply:
    """Start or stop the profiler on every rank; a refusal (off, running already, not running) is the reply's
    error."""
    try:
        if msg.start:
            out = engine.start_profile(record_shapes=msg.record_shapes, num_steps=msg.num_steps)
            return ProfileReply(output_dir=out)
        return ProfileReply(ranks=engine.stop_profile())
    except ValueError as e:
        return ProfileReply(error=str(e))


def serve_engine(engine, inp: zmq.Socket, out: zmq.Socket, watchdog: StepWatchdog | None = None) -> None:
    """Forever: take every queued message, run one step if anything is unfinished, send what changed."""
    last_stats: EngineStats | None = None
    while True:
        if not engine.has_unfinished():
            inp.poll(IDLE_POLL_MS)
        rejected = []
        while True:
            try:
                msg = inp.recv_pyobj(zmq.NOBLOCK)
            except zmq.Again:
                break
            if isinstance(msg, GenerateRequest):
                try:
                    engine.add_request(msg)
                except ValueError as e:  # RequestRejected, or parameters the engine refuses
                    rejected.append(Rejection(msg.rid, str(e), getattr(e, "code", "invalid_request")))
                except Exception as e:  # a fault of this request's admission: refuse it alone
                    logger.exception("request %s could not be admitted", msg.rid)
                    engine.abort_request(msg.rid)
                    rejected.append(Rejection(msg.rid, f"the engine could not admit the request: "
                                              f"{type(e).__name__}: {e}", "internal_error"))
            elif isinstance(msg, AbortRequest):
                engine.abort_request(msg.rid)
            elif isinstance(msg, FlushCache):
                out.send_pyobj(CacheFlushed(engine.flush_prefix_cache()))
            elif isinstance(msg, ProfileControl):
                out.send_pyobj(control_profile(engine, msg))
        outputs = []
        if engine.has_unfinished():
            if watchdog is not None:
                watchdog.step_started = time.monotonic()
            outputs = engine.step()
            if watchdog is not None:
                watchdog.step_started = None
        stats = engine.stats()
        if outputs or rejected or stats != last_stats:
            out.send_pyobj(EngineOutputs(outputs, rejected, stats))
            last_stats = stats
