"""The engine thread: continuous batching for `moepack serve` and `moepack chat`.

One thread owns the runtime `Engine` (which is not thread-safe) and loops: take the jobs submitted since the
last step and `add` them, `cancel` the sequences whose client went away, `step` every sequence in flight
once, and hand each emitted token's text to its job through the job's `emit` callback (the server wraps it
with `loop.call_soon_threadsafe` into an asyncio queue, the chat with a `queue.Queue`). Requests that arrive
while others decode join the engine's batch at the next step and leave when done, so the expert loads of a
layer step are shared by every sequence in flight, and greedy outputs do not depend on what else runs.

Stops: a job ends at its end-of-turn token ids (not shown), at the model's eos, at `max_new_tokens`, or
when one of its stop strings appears in the decoded text: the text from the stop string on is dropped, and
text that could still become a stop string is held back until it cannot, so a stream never shows part of
one. A job's sequence is cancelled the moment it stops, which frees its place and its KV cache at once.

Memory: at most `max_batch` sequences hold a KV cache (the budget planned `max_batch` caches of the full
context); at most `queue_limit` more wait, holding only their token ids; beyond that `submit` raises
`QueueFullError` at once. The engine feeds one prompt chunk per step (`prefill_per_step=1`), so the
activations of a step stay within the one prefill chunk of workspace the budget planned."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from moepack.errors import MoepackError
from moepack.runtime.config import SamplingParams

TRACE_RESET = 200_000  # engine statistics are folded into totals and restarted past this many expert accesses


class QueueFullError(MoepackError):
    """Every place in the batch and in the queue is taken."""


class ShuttingDownError(MoepackError):
    """The server is stopping and takes no new request."""


@dataclass(frozen=True)
class Event:
    """What a job hears from the engine thread: text, then one done (or error) event."""

    kind: str  # "text", "done" or "error"
    text: str = ""
    finish_reason: str | None = None  # done: "stop", "length" or "cancelled"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    decode_s: float | None = None
    status: int = 500  # error: the HTTP status it maps to (503 while shutting down)


@dataclass(eq=False)
class Job:
    """One generation request. `emit` is called on the engine thread and must not block."""

    prompt: list[int]
    sampling: SamplingParams
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    t_submit: float = field(default_factory=time.perf_counter)
    # engine-thread state
    seq: object = None
    stream: object = None
    text: str = ""
    sent: int = 0
    reason: str | None = None
    cancel_asked: bool = False


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (it may still become one)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class EngineWorker:
    def __init__(self, model, *, max_batch: int = 1, queue_limit: int = 0, metrics=None):
        """`model`: a runtime.api.MoePackModel (its tokenizer decodes the text)."""
        from moepack.runtime.engine import Engine

        if max_batch < 1 or queue_limit < 0:
            raise MoepackError(f"max_batch must be >= 1 and queue_limit >= 0, not {max_batch} and {queue_limit}")
        self.model = model
        self.engine = Engine(model.model, max_in_flight=max_batch, prefill_per_step=1)
        self.max_batch, self.queue_limit, self.metrics = max_batch, queue_limit, metrics
        self.eos = frozenset(model.spec.eos_token_ids)
        self._cond = threading.Condition()
        self._inbox: list[Job] = []
        self._cancels: list[Job] = []
        self._outstanding = 0
        self._stopping = False
        self._jobs: dict[int, Job] = {}  # sequence id -> job (engine thread only)
        self._base: Counter = Counter()  # engine totals folded before a statistics restart
        self.totals: dict[str, int] = {}
        self.thread = threading.Thread(target=self._loop, name="moepack-engine", daemon=True)

    # -- any thread ------------------------------------------------------------------------------------
    def start(self) -> EngineWorker:
        self.thread.start()
        return self

    @property
    def outstanding(self) -> int:
        """Jobs submitted and not finished (in the batch or waiting)."""
        return self._outstanding

    def submit(self, job: Job) -> Job:
        """Queue a job for the next step, or raise QueueFullError / ShuttingDownError at once."""
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            if self._outstanding >= self.max_batch + self.queue_limit:
                if self.metrics is not None:
                    with self.metrics.lock:
                        self.metrics.rejected += 1
                raise QueueFullError(f"the server is at capacity ({self.max_batch} requests in the batch and "
                                     f"{self.queue_limit} waiting); retry later")
            self._outstanding += 1
            self._inbox.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job (client gone, Ctrl-C): its sequence leaves the batch before the next step."""
        with self._cond:
            job.cancel_asked = True
            self._cancels.append(job)
            self._cond.notify()

    def begin_stop(self) -> None:
        """Take no new job; the thread ends after the current step and pending jobs get an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the thread (see begin_stop) and wait for it."""
        self.begin_stop()
        if self.thread.is_alive():
            self.thread.join(timeout)

    # -- the engine thread -----------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._inbox or self._cancels or self._stopping or not self.engine.idle):
                        self._cond.wait()
                    if self._stopping:
                        break
                    new, self._inbox = self._inbox, []
                    cancels, self._cancels = self._cancels, []
                for job in new:
                    self._add(job)
                for job in cancels:
                    if job.seq is not None and not job.seq.done:
                        job.reason = job.reason or "cancelled"
                        self.engine.cancel(job.seq)
                if not self.engine.idle:
                    try:
                        emitted = self.engine.step()
                    except Exception as exc:  # noqa: BLE001 - the requests in flight get it; serving goes on
                        self._fail_all(exc)
                        emitted = []
                    for seq, token in emitted:
                        job = self._jobs.get(seq.id)
                        if job is not None:
                            self._token(job, token)
                for seq in self.engine.collect():
                    job = self._jobs.pop(seq.id, None)
                    if job is not None:
                        self._finish(job)
                self._publish()
            with self._cond:
                left, self._inbox = self._inbox, []
            for job in [*left, *self._jobs.values()]:
                self._send(job, Event("error", text="the server is shutting down", status=503))
            self._jobs.clear()
            self.engine.close()

    def _send(self, job: Job, event: Event) -> None:
        try:
            job.emit(event)
        except RuntimeError:  # the client's event loop is closed: nobody listens any more
            pass
        if event.kind != "text":
            with self._cond:
                self._outstanding -= 1

    def _add(self, job: Job) -> None:
        from moepack.runtime.sampling import TextStream

        if job.cancel_asked:
            self._send(job, Event("done", finish_reason="cancelled", prompt_tokens=len(job.prompt)))
            return
        s = job.sampling
        try:
            job.seq = self.engine.add(job.prompt, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                      top_p=s.top_p, seed=s.seed, stop_at_eos=True)
        except MoepackError as exc:
            self._send(job, Event("error", text=str(exc)))
            return
        job.stream = TextStream(self.model.tokenizer, job.prompt) if self.model.tokenizer is not None else None
        self._jobs[job.seq.id] = job

    def _token(self, job: Job, token: int) -> None:
        if job.reason is not None:
            return
        if token in job.stop_ids:
            job.reason = "stop"
            self.engine.cancel(job.seq)
            return
        if job.stream is not None:
            delta = job.stream.push(token)
        else:
            delta = f"{token} "
        if not delta:
            return
        start = max(0, len(job.text) - max((len(s) for s in job.stop), default=0))
        job.text += delta
        hold = 0
        if job.stop:
            hits = [i for s in job.stop if (i := job.text.find(s, start)) >= 0]
            if hits:
                job.text = job.text[:min(hits)]
                job.reason = "stop"
                self.engine.cancel(job.seq)
            else:
                hold = held_back(job.text, job.stop)
        end = len(job.text) - hold
        if end > job.sent:
            self._send(job, Event("text", text=job.text[job.sent:end]))
            job.sent = end

    def _finish(self, job: Job) -> None:
        seq = job.seq
        if job.stream is not None and job.reason is None:  # the whole answer: an incomplete character at its
            full = self.model.tokenizer.decode(job.stream.ids, skip_special_tokens=True)  # end shows as U+FFFD
            if full.startswith(job.text):
                job.text = full
        if len(job.text) > job.sent:  # text held back for a stop string that never came
            self._send(job, Event("text", text=job.text[job.sent:]))
            job.sent = len(job.text)
        reason = job.reason
        if reason is None:
            if seq.cancelled:
                reason = "cancelled"
            else:
                reason = "stop" if seq.tokens and seq.tokens[-1] in self.eos else "length"
        ttft = seq.t_first - job.t_submit if seq.t_first is not None else None
        decode = seq.t_done - seq.t_first if seq.t_first is not None else None
        if self.metrics is not None:
            self.metrics.finished(prompt_tokens=len(job.prompt), completion_tokens=len(seq.tokens), ttft_s=ttft,
                                  decode_s=decode)
        self._send(job, Event("done", finish_reason=reason, prompt_tokens=len(job.prompt),
                              completion_tokens=len(seq.tokens), ttft_s=ttft, decode_s=decode))

    def _fail_all(self, exc: Exception) -> None:
        """A step failed: every sequence in flight or waiting gets the error and leaves; the engine goes on."""
        message = str(exc) if isinstance(exc, MoepackError) else f"the engine failed: {type(exc).__name__}: {exc}"
        if self.metrics is not None:
            with self.metrics.lock:
                self.metrics.engine_errors += 1
        for seq in [*self.engine.waiting, *self.engine.active]:
            self.engine.cancel(seq)
        self.engine.collect()
        for job in self._jobs.values():
            self._send(job, Event("error", text=message))
        self._jobs.clear()

    def _publish(self) -> None:
        es = self.engine.stats
        current = Counter(hits=es.cache.hits, misses=es.cache.misses, bytes=es.cache.bytes_loaded,
                          bytes_decode=es.cache.bytes_loaded_decode, decode_tokens=es.decode_tokens, steps=es.steps)
        totals = self._base + current
        self.totals = {k: totals.get(k, 0) for k in ("hits", "misses", "bytes", "bytes_decode", "decode_tokens",
                                                     "steps")}
        if len(es.trace) > TRACE_RESET:  # the trace grows with every access: restart it, keep the totals
            self._base = totals
            self.engine.reset_stats()
        if self.metrics is not None:
            self.metrics.set_engine(self.totals, waiting=len(self._inbox) + len(self.engine.waiting),
                                    running=len(self.engine.active))
