"""Expert loads that do not block compute: the executor issues a load into a cache slot and waits for it only
when it computes that expert, so resident experts compute while misses (and prefetches) travel.

CPU: one worker thread runs the streamer's copies (reads release the GIL); a copy the thread has not started
when compute needs it is taken back and run inline, so compute never waits for the thread to be scheduled
(on a machine with no idle core that costs milliseconds). CUDA: the streamer already copies on a side stream
and returns an event."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from moepack.runtime.prepared import CLOCK
from moepack.runtime.streamer import Streamer

Key = tuple[int, int]


class AsyncLoader:
    def __init__(self, streamer: Streamer):
        self.streamer = streamer
        self.cuda = streamer.cuda
        self.pool: ThreadPoolExecutor | None = None
        self.pending: dict[Key, Future | torch.cuda.Event] = {}
        self.targets: dict[Key, torch.Tensor] = {}  # CPU: where each pending copy goes
        self.busy_s = 0.0  # time the worker spent copying (CPU)
        self._lock = threading.Lock()

    def _copy(self, key: Key, dst: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.streamer.load(key, dst)
        with self._lock:
            self.busy_s += time.perf_counter() - t0

    def submit(self, key: Key, dst: torch.Tensor) -> None:
        if self.cuda:
            event = self.streamer.load(key, dst)
            if event is not None:
                self.pending[key] = event
            return
        if self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="moepack-load")
        self.targets[key] = dst
        self.pending[key] = self.pool.submit(self._copy, key, dst)

    def in_flight(self, key: Key) -> bool:
        return key in self.pending

    def wait(self, key: Key) -> float:
        """Block until `key` has arrived; returns the seconds compute stalled (also counted on CLOCK)."""
        handle = self.pending.pop(key, None)
        if handle is None:
            return 0.0
        t0 = time.perf_counter()
        if self.cuda:
            if not handle.query():
                handle.synchronize()
            torch.cuda.current_stream().wait_event(handle)
        else:
            dst = self.targets.pop(key)
            if handle.cancel():  # not started: copy it here
                self._copy(key, dst)
            else:
                handle.result()
        stalled = time.perf_counter() - t0
        CLOCK.s += stalled
        return stalled

    def drain(self) -> float:
        return sum(self.wait(key) for key in list(self.pending))

    def close(self) -> None:
        self.drain()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
