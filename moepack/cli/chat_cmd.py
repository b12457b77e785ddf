"""`moepack chat`: an interactive terminal chat over the server's engine thread and chat template.

Each answer streams as it is generated. The conversation is kept and rendered through the pack's chat
template every turn (the plain fallback for packs without one); when it no longer fits the context the
oldest turns are dropped (the system message stays) and the chat says so. Commands: /reset clears the
history, /stats shows the last answer's and the session's figures, /exit (or Ctrl-D) leaves. Ctrl-C while
an answer streams stops that answer (its sequence leaves the engine at once) and the chat goes on; the
part already shown stays in the history."""

from __future__ import annotations

import queue
import sys
from collections.abc import Callable
from dataclasses import dataclass

from moepack.errors import MoepackError
from moepack.serve.template import ChatTemplate
from moepack.serve.worker import EngineWorker, Event, Job
from moepack.units import format_size

HELP = "commands: /reset (clear the history), /stats, /exit (or Ctrl-D); Ctrl-C stops an answer"


@dataclass
class Turn:
    text: str
    reason: str  # stop, length, interrupted, error
    prompt_tokens: int = 0
    tokens: int = 0
    ttft_s: float | None = None
    decode_s: float | None = None


class ChatSession:
    """A conversation over an EngineWorker: render, submit, stream, keep the history."""

    def __init__(self, model, worker: EngineWorker, template: ChatTemplate, *, stop_ids: frozenset[int],
                 sampling, system: str | None = None):
        self.model, self.worker, self.template = model, worker, template
        self.stop_ids, self.sampling, self.system = stop_ids, sampling, system
        self.history: list[dict[str, str]] = []
        self.last: Turn | None = None
        self.turns = 0
        self.dropped = 0  # messages dropped to fit the context, this session

    def reset(self) -> None:
        self.history, self.last = [], None

    def _messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def prompt(self) -> tuple[list[int], int]:
        """Token ids of the conversation and the answer's token limit, dropping the oldest turns to fit."""
        context, want = self.model.context, self.sampling.max_new_tokens
        while True:
            text = self.template.render(self._messages(), add_generation_prompt=True)
            ids = self.model.tokenizer.encode(text, add_special_tokens=False).ids
            room = context - len(ids)
            if room >= min(want, 16) or len(self.history) <= 1:
                break
            drop = 2 if len(self.history) > 2 and self.history[0]["role"] == "user" else 1
            self.history, self.dropped = self.history[drop:], self.dropped + drop
        if room < 1:
            raise MoepackError(f"the message is {len(ids)} tokens with the template; the context is {context} "
                               f"tokens (raise --context)")
        return ids, min(want, room)

    def reply(self, text: str, write: Callable[[str], None]) -> Turn:
        """Answer one user message, writing the text as it streams; Ctrl-C (KeyboardInterrupt raised while
        waiting or writing) stops the answer and returns what was said."""
        from dataclasses import replace

        self.history.append({"role": "user", "content": text})
        dropped = self.dropped
        try:
            ids, limit = self.prompt()
        except MoepackError:
            self.history.pop()
            raise
        if self.dropped > dropped:
            write(f"(dropped {self.dropped - dropped} old messages to fit the context)\n")
        events: queue.Queue[Event] = queue.Queue()
        job = Job(ids, replace(self.sampling, max_new_tokens=limit), emit=events.put,
                  stop=self.template.stop_strings, stop_ids=self.stop_ids)
        parts: list[str] = []
        end: Event | None = None
        interrupted = submitted = False
        try:
            self.worker.submit(job)
            submitted = True
            while end is None:
                try:
                    ev = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                if ev.kind == "text":
                    parts.append(ev.text)
                    write(ev.text)
                else:
                    end = ev
        except KeyboardInterrupt:
            interrupted = True
            if submitted:
                self.worker.cancel(job)
                end = _drain(events)
        answer = "".join(parts)
        self.history.append({"role": "assistant", "content": answer})
        self.turns += 1
        if end is not None and end.kind == "error":
            turn = Turn(answer, "error", len(ids))
            self.last = turn
            raise MoepackError(f"the answer failed: {end.text}")
        reason = "interrupted" if interrupted else end.finish_reason
        self.last = Turn(answer, reason, len(ids), end.completion_tokens if end else len(parts),
                         end.ttft_s if end else None, end.decode_s if end else None)
        return self.last

    def stats_lines(self) -> list[str]:
        out = [f"turns: {self.turns}; history: {len(self.history)} messages"
               + (f" ({self.dropped} dropped to fit)" if self.dropped else "")]
        if self.last is not None:
            t = self.last
            line = f"last answer: {t.tokens} tokens after {t.prompt_tokens} prompt tokens ({t.reason})"
            out.append(line)
            if t.ttft_s is not None:
                speed = (t.tokens - 1) / t.decode_s if t.decode_s and t.tokens > 1 else None
                out.append(f"time to first token: {t.ttft_s * 1000:.0f} ms"
                           + (f"; decode: {speed:.1f} tokens/s" if speed else ""))
        tot = self.worker.totals
        accesses = tot.get("hits", 0) + tot.get("misses", 0)
        if getattr(self.model.executor, "cache", None) is None:
            out.append("experts: all used in place (no --vram budget, no cache)")
        elif accesses:
            out.append(f"expert cache hit rate: {tot['hits'] / accesses:.1%} ({tot['hits']} of {accesses})")
        if accesses and tot.get("decode_tokens"):
            out.append(f"expert bytes moved per token: {format_size(tot['bytes_decode'] / tot['decode_tokens'])}")
        out.append(f"context: {self.model.context} tokens; template: "
                   + ("plain fallback" if self.template.plain else "the pack's chat template"))
        return out


def _drain(events: queue.Queue, timeout: float = 30.0) -> Event | None:
    """After a cancel: wait for the job's last event (the sequence leaves before the next step)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ev = events.get(timeout=0.1)
        except queue.Empty:
            continue
        except KeyboardInterrupt:  # a second Ctrl-C while the answer stops: keep waiting
            continue
        if ev.kind != "text":
            return ev
    return None


def chat_loop(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> int:
    """The read-answer loop; returns the exit code. `read` raises EOFError at the end of input."""
    write(f"{HELP}\n")
    while True:
        try:
            line = read("> ")
        except EOFError:
            write("\n")
            return 0
        except KeyboardInterrupt:
            write("\n(/exit or Ctrl-D leaves)\n")
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return 0
        if cmd == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        if cmd == "/stats":
            write("\n".join(session.stats_lines()) + "\n")
            continue
        if cmd in ("/help", "/?"):
            write(HELP + "\n")
            continue
        if cmd.startswith("/") and " " not in cmd:
            write(f"unknown command {cmd}; {HELP}\n")
            continue
        try:
            turn = session.reply(line, write)
        except MoepackError as exc:
            write(f"\nerror: {exc}\n")
            continue
        write("\n" if turn.reason != "interrupted" else "\n(stopped)\n")


def run(pack: str, config, sampling, *, system: str | None) -> int:
    from rich.console import Console

    from moepack.runtime.api import MoePackModel
    from moepack.serve.template import generation_eos_ids
    from moepack.source import resolve_pack

    err = Console(stderr=True)
    with err.status("loading pack", spinner="dots"):
        model = MoePackModel.load(resolve_pack(pack), config)
    if model.tokenizer is None:
        raise MoepackError("the pack has no tokenizer.json, so it cannot chat", path=model.pack.path)
    template = ChatTemplate.from_pack(model.pack)
    if template.plain:
        err.print("[dim]the pack has no chat template: using the plain 'User:/Assistant:' form[/]",
                  highlight=False)
    if model.budget is not None:
        err.print(f"[dim]budget: {model.budget.describe()}[/]", highlight=False)
    eos = tuple(model.spec.eos_token_ids) + generation_eos_ids(model.pack)
    worker = EngineWorker(model, max_batch=1, queue_limit=0).start()
    session = ChatSession(model, worker, template, stop_ids=template.stop_ids(model.tokenizer, eos),
                          sampling=sampling, system=system)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        return chat_loop(session, input, write)
    finally:
        worker.stop()
