"""`moepack chat`: the read-answer loop driven by scripted input (history, /reset, /stats, /exit, a simulated
Ctrl-C in the middle of an answer) and the command itself in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moepack.cli.chat_cmd import ChatSession, chat_loop
from moepack.runtime.api import MoePackModel
from moepack.runtime.config import SamplingParams
from moepack.serve.template import ChatTemplate
from moepack.serve.worker import EngineWorker

CONTEXT = 128
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pack(baby, tmp_path_factory):
    from moepack.compress import compress

    out = tmp_path_factory.mktemp("chat") / "c.moepack"
    compress(str(baby("mixtral")), out, recipe="q4g32")
    return out


@pytest.fixture(scope="module")
def model(pack):
    return MoePackModel.load(pack, context=CONTEXT)


class Script:
    """Input lines, then EOF; the answer to message `interrupt_at` raises KeyboardInterrupt on its 2nd chunk."""

    def __init__(self, lines, interrupt_at=None):
        self.lines, self.out, self.interrupt_at = list(lines), [], interrupt_at
        self.messages = 0
        self.chunks = 0

    def read(self, prompt: str) -> str:
        self.out.append(prompt)
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if not line.startswith("/"):
            self.messages += 1
            self.chunks = 0
        return line

    def write(self, text: str) -> None:
        if self.messages == self.interrupt_at and not text.startswith(("(", "\n")):
            self.chunks += 1
            if self.chunks == 2:
                raise KeyboardInterrupt
        self.out.append(text)

    @property
    def text(self) -> str:
        return "".join(self.out)


def session(model, n=12, system=None):
    template = ChatTemplate.from_pack(model.pack)
    worker = EngineWorker(model, max_batch=1, queue_limit=0).start()
    return ChatSession(model, worker, template, stop_ids=template.stop_ids(model.tokenizer, (1,)),
                       sampling=SamplingParams(max_new_tokens=n), system=system), worker


def test_history_commands_and_a_stopped_answer(model):
    s, worker = session(model, n=40)
    try:
        script = Script(["hello", "/stats", "Speak on", "again", "/reset", "/stats", "/exit", "never read"],
                        interrupt_at=2)
        assert chat_loop(s, script.read, script.write) == 0
        assert script.lines == ["never read"]
        out = script.text
        # the first answer is the greedy continuation of the plain template's prompt
        prompt = s.template.render([{"role": "user", "content": "hello"}])
        assert prompt == "User: hello\nAssistant:"
        want = model.generate(model.tokenizer.encode(prompt, add_special_tokens=False).ids, max_new_tokens=40).text
        assert want.split("\nUser:")[0] in out
        assert "turns: 1; history: 2 messages" in out and "last answer:" in out
        assert "(stopped)" in out  # the Ctrl-C stopped the 2nd answer, and the chat went on to the 3rd
        assert "(history cleared)" in out and "turns: 3; history: 0 messages" in out
        assert worker.outstanding == 0 and worker.engine.idle
    finally:
        worker.stop()


def test_interrupted_answer_stays_in_history_and_frees_the_engine(model):
    s, worker = session(model, n=60)
    try:
        script = Script(["To be, or not to be"], interrupt_at=1)
        chat_loop(s, script.read, script.write)
        assert s.last.reason == "interrupted" and s.last.tokens < 60
        assert [m["role"] for m in s.history] == ["user", "assistant"]
        assert worker.outstanding == 0 and worker.engine.idle and not worker.engine.active
    finally:
        worker.stop()


def test_long_history_drops_old_turns(model):
    s, worker = session(model, n=8, system="Be brief.")
    try:
        for i in range(12):
            s.reply(f"message number {i} " + "word " * 6, lambda text: None)
        assert s.dropped > 0 and s.history[0]["role"] == "user"
        assert s.history[-2]["content"].startswith("message number 11")
        ids, limit = s.prompt()
        assert len(ids) + limit <= CONTEXT
    finally:
        worker.stop()


def test_chat_command_in_a_subprocess(pack):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "moepack", "chat", str(pack), "--context", str(CONTEXT), "-n", "6",
                          "--threads", "1"], input="hi there\n/stats\n/bogus\n/reset\n/exit\n", text=True,
                         capture_output=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "turns: 1; history: 2 messages" in res.stdout
    assert "unknown command /bogus" in res.stdout and "(history cleared)" in res.stdout
    assert "plain" in res.stderr  # the baby pack has no template: the fallback is named
    bad = subprocess.run([sys.executable, "-m", "moepack", "chat", str(pack), "--temperature", "-1"], text=True,
                         capture_output=True, timeout=60, env=env)
    assert bad.returncode == 2 and "temperature" in bad.stderr and "Traceback" not in bad.stderr


def test_ctrl_c_in_a_subprocess_stops_the_answer_not_the_chat(pack):
    """A real SIGINT while an answer streams: '(stopped)', then the chat reads the next command."""
    import signal
    import threading
    import time

    n = 200
    model = MoePackModel.load(pack, context=256)  # the baby's positions, the chat's default context here
    prompt = next(p for p in ("Speak on", "Tell me more", "Go on, go on", "Sing")  # one that runs to n tokens
                  if len(model.generate(model.tokenizer.encode(f"User: {p}\nAssistant:",
                                                               add_special_tokens=False).ids,
                                        max_new_tokens=n).tokens) == n)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moepack", "chat", str(pack), "-n", str(n), "--threads", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = bytearray()

    def pump():
        while chunk := proc.stdout.read1(4096):
            out.extend(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()

    def wait_for(pred, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not pred() and time.monotonic() < deadline:
            time.sleep(0.005)
        return pred()

    try:
        assert wait_for(lambda: b"> " in out), out
        proc.stdin.write(f"{prompt}\n".encode())
        proc.stdin.flush()
        start = out.index(b"> ") + 2
        assert wait_for(lambda: len(out) > start + 2), out  # the answer streams
        proc.send_signal(signal.SIGINT)
        assert wait_for(lambda: b"(stopped)" in out), out
        proc.stdin.write(b"/stats\n/exit\n")
        proc.stdin.flush()
        assert proc.wait(60) == 0
        reader.join(10)
        text = out.decode("utf-8", "replace")
        assert "(interrupted)" in text and "turns: 1" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
