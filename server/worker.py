"""`ModelWorker`: the one thread that runs every model call, which the engine can replace when it dies.

A model call that raises an ordinary exception fails only that call. A worker that dies (a fatal
error escapes, or it is killed) fails every call it still held with `WorkerDied`, so nothing
waiting on it hangs; the engine then starts a fresh worker.
"""
from __future__ import annotations

import asyncio
import ctypes
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

_names = itertools.count()


class WorkerDied(RuntimeError):
    """The model worker stopped; the message says why. Sessions using it must start again."""


class WorkerKilled(BaseException):
    """Raised inside the worker thread by `kill()`; a BaseException so model code cannot swallow it."""


class ModelWorker:
    """A single thread with a job queue; `call()` runs a function there and awaits its result."""

    def __init__(self, name: str = "model-worker") -> None:
        self.name = f"{name}-{next(_names)}"
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._dead_reason: str | None = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._dead_reason is None

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the worker; raise WorkerDied if the worker is (or goes) down first."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:  # a job is either queued before death (and failed by it) or refused here
            if self._dead_reason is not None:
                raise WorkerDied(self._dead_reason)
            self._jobs.put((fn, args, future, loop))
        return await future

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish queued calls, then end the thread (blocking; run it off the event loop)."""
        with self._lock:
            if self._dead_reason is None:
                self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def kill(self) -> None:
        """End the worker at its next Python instruction, as a crash would (tests and hung-model recovery)."""
        ident = self._thread.ident
        if ident is None or not self._thread.is_alive():
            return
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(WorkerKilled))
        self._jobs.put(None)  # wake it if it is waiting for work, so the kill lands now

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the thread to end; True if it did."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        current = None
        try:
            while True:
                current = self._jobs.get()
                if current is None:
                    return
                fn, args, future, loop = current
                try:
                    result = fn(*args)
                except Exception as exc:  # noqa: BLE001 - this call failed; the worker carries on
                    _resolve(loop, future, exc=exc)
                else:
                    _resolve(loop, future, result=result)
                current = None
        except BaseException as exc:  # noqa: BLE001 - killed, or a fatal error escaped the model
            reason = f"the model worker died ({type(exc).__name__}: {exc})" if str(exc) else \
                f"the model worker died ({type(exc).__name__})"
            self._die(reason, current)
        finally:
            if self._dead_reason is None:
                self._die("the model worker was stopped", None)

    def _die(self, reason: str, current: Any) -> None:
        with self._lock:
            self._dead_reason = reason
            pending = [current] if current is not None else []
            while True:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    pending.append(item)
        for _, _, future, loop in pending:
            _resolve(loop, future, exc=WorkerDied(reason))


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any = None,
             exc: BaseException | None = None) -> None:
    def settle() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass  # the loop is closed; nobody is waiting any more
