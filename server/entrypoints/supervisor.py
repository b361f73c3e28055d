"""The engine process as the HTTP process sees it: started, spoken to over zmq, watched, stopped.

:class:`EngineSupervisor` spawns the engine process (:func:`server.entrypoints.engine_process.run_engine_process`),
binds the two zmq sockets (requests out, outputs in), hands every message that comes back to its owner, and watches
the engine process and every worker it reports: a death is reported once, with the process that died. Stopping
sends SIGTERM (the engine shuts its workers down in order) and then kills whatever is left of the process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from server.entrypoints.args import ServerArgs
from server.entrypoints.engine_process import run_engine_process

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2
ENGINE_STOP_TIMEOUT_S = 10.0


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a dead child its parent has not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


class EngineSupervisor:
    """Starts, talks to, watches and stops the engine process (see the module docstring). ``ready`` is set by the
    owner once the engine said it is ready: a death before that is reported after the engine's own last words."""

    def __init__(self, args: ServerArgs):
        self.args = args
        self.ready = False
        self.worker_pids: list[int] = []
        self._proc: mp.process.BaseProcess | None = None
        self._tasks: list[asyncio.Task] = []
        self._dead = False

    async def start(self, on_message: Callable[[object], Awaitable[None]], on_death: Callable[[str], None]) -> None:
        """Spawn the engine process; ``on_message(msg)`` gets every message it sends, ``on_death(reason)`` is called
        once if it or a worker dies, or a message cannot be handled."""
        self._on_message, self._on_death = on_message, on_death
        self._ipc_dir = tempfile.mkdtemp(prefix="server-zmq-")
        requests_addr = f"ipc://{self._ipc_dir}/requests"
        outputs_addr = f"ipc://{self._ipc_dir}/outputs"
        self._sync_ctx = zmq.Context()
        self._to_engine = self._sync_ctx.socket(zmq.PUSH)
        self._to_engine.setsockopt(zmq.SNDHWM, 0)  # never block the event loop on a busy engine
        self._to_engine.bind(requests_addr)
        self._async_ctx = zmq.asyncio.Context()
        self._from_engine = self._async_ctx.socket(zmq.PULL)
        self._from_engine.setsockopt(zmq.RCVHWM, 0)
        self._from_engine.bind(outputs_addr)
        self._proc = mp.get_context("spawn").Process(
            target=run_engine_process,
            args=(self.args.engine, requests_addr, outputs_addr, self.args.log_level, self.args.watchdog_timeout),
            name="engine",
        )
        self._proc.start()
        logger.info("engine process %d started; loading the model", self._proc.pid)
        self._tasks = [asyncio.create_task(self._receive_loop()), asyncio.create_task(self._watch_loop())]

    def send(self, msg: object) -> bool:
        """Queue ``msg`` for the engine; False when no engine is connected any more."""
        try:
            self._to_engine.send_pyobj(msg, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def dead_process(self) -> str | None:
        """Which of the engine's processes died, if any."""
        dead = [pid for pid in self.worker_pids if not pid_alive(pid)]
        if dead:
            return f"worker process {dead[0]} died"
        if not self._proc.is_alive():
            return f"the engine process exited with code {self._proc.exitcode}"
        return None

    def report_death(self, reason: str) -> None:
        if not self._dead:
            self._dead = True
            self._on_death(reason)

    async def stop(self) -> None:
        """Stop the engine process and every worker, remove the sockets."""
        for task in self._tasks:
            task.cancel()
        if self._proc is not None:
            await asyncio.to_thread(self._stop_process)
        self._to_engine.close(linger=0)
        self._from_engine.close(linger=0)
        self._sync_ctx.term()
        self._async_ctx.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def _stop_process(self) -> None:
        proc = self._proc
        if proc.is_alive():
            proc.terminate()  # SIGTERM: the engine shuts its workers down in order
            proc.join(ENGINE_STOP_TIMEOUT_S)
        self.kill_tree()
        proc.join(ENGINE_STOP_TIMEOUT_S)

    def kill_tree(self) -> None:
        """SIGKILL the engine and its workers (a hung or stopped process, or what is left after a death)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        for pid in self.worker_pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    async def _receive_loop(self) -> None:
        while True:
            try:
                msg = await self._from_engine.recv_pyobj()
            except asyncio.CancelledError:
                raise
            except Exception:  # a message that does not unpickle: drop it, keep serving
                logger.exception("dropped a message from the engine that could not be read")
                continue
            try:
                await self._on_message(msg)
            except Exception as e:  # a bug here must not leave every waiting client hanging
                logger.exception("failed to handle %s from the engine", type(msg).__name__)
                self.report_death(f"internal error in the server: {type(e).__name__}: {e}")
                return

    async def _watch_loop(self) -> None:
        while not self._dead:
            await asyncio.sleep(WATCH_INTERVAL_S)
            reason = self.dead_process()
            if reason is not None:
                if not self.ready:
                    await asyncio.sleep(1.0)  # let the receive loop deliver the engine's own last words first
                    reason += " before it was ready"
                self.report_death(reason)
