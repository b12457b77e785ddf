"""`moepack serve`: a real server process on a free loopback port, driven by the official `openai` client
(chat, completions, streaming, models) and raw HTTP (errors, queue limit, metrics); the engine thread's stop
handling in process. Greedy answers are compared with `MoePackModel.generate` on the same prompt alone."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from moepack.runtime.api import MoePackModel  # noqa: E402
from moepack.runtime.config import SamplingParams  # noqa: E402
from moepack.serve.template import ChatTemplate  # noqa: E402
from moepack.serve.worker import EngineWorker, Job, QueueFullError, held_back  # noqa: E402

KEY = "test-key-123"
CONTEXT = 256  # the baby models' positions
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

pytestmark = pytest.mark.usefixtures("one_thread")


def chat_checkpoint(src, dst):
    """A copy of a baby checkpoint whose tokenizer has ChatML's turn tokens and whose config has the template."""
    from tokenizers import AddedToken, Tokenizer

    shutil.copytree(src, dst)
    tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.save(str(dst / "tokenizer.json"))
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.update(chat_template=CHATML, eos_token="<|im_end|>")
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def pack(baby, tmp_path_factory):
    from moepack.compress import compress

    root = tmp_path_factory.mktemp("serve")
    src = chat_checkpoint(baby("mixtral", vocab_size=520), root / "ckpt")
    out = root / "chat.moepack"
    compress(str(src), out, recipe="q4g32")
    return out


@pytest.fixture(scope="module")
def local(pack):
    return MoePackModel.load(pack, context=CONTEXT)


def reference(pm, ids: list[int], n: int) -> str:
    return pm.generate(ids, max_new_tokens=n).text


@pytest.fixture(scope="module")
def server(pack):
    """A `moepack serve` process on a free port (127.0.0.1), killed at the end whatever happens."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MOEPACK_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "moepack", "serve", str(pack), "--port", "0", "--context",
                             str(CONTEXT), "--max-batch", "4", "--queue-limit", "2", "--api-key", KEY, "--threads",
                             "1", "--name", "baby"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=env)
    lines: list[str] = []
    found = threading.Event()
    port: list[int] = []

    def pump():
        for line in proc.stderr:
            lines.append(line)
            if (m := re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)) and not port:
                port.append(int(m.group(1)))
                found.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        if not found.wait(120):
            pytest.fail(f"the server did not start: {''.join(lines)}")
        base = f"http://127.0.0.1:{port[0]}"
        for _ in range(100):
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()  # SIGTERM: a graceful shutdown, without a traceback
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    # uvicorn shuts down gracefully, then re-raises the signal: exit status -15 (or 0)
    assert proc.returncode in (0, -15) and not any("Traceback" in line for line in lines), "".join(lines)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, timeout=60, max_retries=0)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def chat_ids(pm, messages) -> list[int]:
    text = ChatTemplate.from_pack(pm.pack).render(messages, add_generation_prompt=True)
    return pm.tokenizer.encode(text, add_special_tokens=False).ids


# -- the openai client --------------------------------------------------------------------------------------
def test_models_and_health(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["baby"]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["model"] == "baby"


def test_completion_equals_local_generation(client, local):
    prompt = "Shall I compare thee to a summer's day?"
    out = client.completions.create(model="baby", prompt=prompt, max_tokens=12, temperature=0)
    want = reference(local, local.encode(prompt), 12)
    assert out.choices[0].text == want
    assert out.usage.prompt_tokens == len(local.encode(prompt))
    assert out.usage.completion_tokens <= 12 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.choices[0].finish_reason in ("stop", "length")


def test_chat_uses_the_template_and_streams_the_same_text(client, local):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not to be?"}]
    out = client.chat.completions.create(model="baby", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference(local, chat_ids(local, messages), 10)
    assert out.usage.prompt_tokens == len(chat_ids(local, messages))
    chunks = list(client.chat.completions.create(model="baby", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [out.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_streamed_completion_and_done_marker(server, client, local):
    prompt = "Now is the winter of our discontent"
    parts = [c.choices[0].text for c in client.completions.create(model="baby", prompt=prompt, max_tokens=9,
                                                                  temperature=0, stream=True)]
    assert "".join(parts) == reference(local, local.encode(prompt), 9)
    with httpx.stream("POST", server + "/v1/completions", headers=auth(), timeout=30,
                      json={"prompt": prompt, "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(client, local, stream):
    prompt = "All the world's a stage"
    full = reference(local, local.encode(prompt), 16)
    clean = [i for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2]]
    assert clean, full
    stop = full[clean[0]:clean[0] + 2]
    kw = dict(model="baby", prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "never-appears"])
    if stream:
        chunks = list(client.completions.create(stream=True, **kw))
        text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        out = client.completions.create(**kw)
        text, reason = out.choices[0].text, out.choices[0].finish_reason
    assert text == full[:full.index(stop)] and reason == "stop"


def test_output_does_not_depend_on_what_else_is_in_flight(client, local):
    """Greedy answers of concurrent requests (4 in the batch, 2 queued) equal each prompt run alone."""
    prompts = ["Friends, Romans, countrymen", "If music be the food of love", "We are such stuff",
               "The quality of mercy", "Rough winds do shake", "Now is the winter"]
    sizes = [12, 5, 9, 14, 3, 8]
    want = [reference(local, local.encode(p), n) for p, n in zip(prompts, sizes, strict=True)]

    def ask(i: int) -> str:
        return client.completions.create(model="baby", prompt=prompts[i], max_tokens=sizes[i],
                                         temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, range(len(prompts))))
    assert got == want


# -- raw HTTP: bad input, limits, metrics --------------------------------------------------------------------
BAD = [
    ("completions", b"{not json", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("completions", {"prompt": "x", "seed": -3}, 400, "seed"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("completions", {"prompt": [5, 99999]}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"max_tokens": 3}, 400, "prompt"),
    ("completions", {"prompt": "word " * 600, "max_tokens": 4}, 400, None),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, None),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "stream"),
    ("chat/completions", {"messages": "hello"}, 400, "messages"),
]


def test_bad_requests_get_a_clear_4xx_and_the_server_lives(server):
    for route, body, status, param in BAD:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(f"{server}/v1/{route}", headers={**auth(), "Content-Type": "application/json"}, timeout=30,
                       **kw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], body
        if param is not None:
            assert err["param"] and err["param"].startswith(param), (body, err)
    r = httpx.post(f"{server}/v1/completions", headers=auth(), json={"prompt": "word " * 600, "max_tokens": 4})
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(f"{server}/v1/completions", headers=auth(), content=b"x" * (2 << 20))
    assert r.status_code == 413
    assert httpx.get(f"{server}/v1/completions", headers=auth()).status_code == 405
    assert httpx.get(f"{server}/v1/nothing", headers=auth()).status_code == 404
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_api_key_is_required(server):
    body = {"prompt": "x", "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()


def test_full_queue_gets_429_and_disconnects_free_their_places(server):
    """4 in the batch + 2 waiting: a 7th request is refused at once; closing the streams cancels them, and the
    server serves again."""
    body = {"messages": [{"role": "user", "content": "Speak"}], "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30, headers=auth()) as c:
        streams = [c.stream("POST", f"{server}/v1/chat/completions", json=body) for _ in range(6)]
        responses = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in responses] == [200] * 6, [r.read() for r in responses]
            r = httpx.post(f"{server}/v1/completions", headers=auth(), json={"prompt": "x", "max_tokens": 1})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        h = httpx.get(f"{server}/health").json()
        if h["running"] == 0 and h["waiting"] == 0:
            break
        time.sleep(0.1)
    assert (h["running"], h["waiting"]) == (0, 0)
    r = httpx.post(f"{server}/v1/completions", headers=auth(), json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200
    metrics = httpx.get(f"{server}/metrics").text
    assert re.search(r"^moepack_requests_rejected_total [1-9]", metrics, re.M)


def test_metrics_in_prometheus_format(server, client):
    client.completions.create(model="baby", prompt="We are such stuff", max_tokens=4, temperature=0)
    text = httpx.get(f"{server}/metrics").text
    for name in ("moepack_requests_total", "moepack_generated_tokens_total", "moepack_queue_depth",
                 "moepack_expert_cache_hit_rate", "moepack_expert_bytes_per_token",
                 "moepack_time_to_first_token_seconds", "moepack_decode_tokens_per_second"):
        assert f"# TYPE {name} " in text, name
    assert re.search(r'moepack_requests_total\{endpoint="/v1/completions",status="200"\} [1-9]', text)
    buckets = [int(v) for v in re.findall(r'^moepack_time_to_first_token_seconds_bucket\{le="[^"]+"\} (\d+)',
                                          text, re.M)]
    assert buckets == sorted(buckets) and buckets[-1] >= 1
    count = re.search(r"^moepack_time_to_first_token_seconds_count (\d+)", text, re.M)
    assert int(count.group(1)) == buckets[-1]
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_]+(\{[^}]*\})? (NaN|[-+0-9.e]+)', line), line


# -- the engine thread in process ------------------------------------------------------------------------------
def run_job(worker: EngineWorker, ids, n, **kw):
    import queue

    events: queue.Queue = queue.Queue()
    worker.submit(Job(ids, SamplingParams(max_new_tokens=n), emit=events.put, **kw))
    parts = []
    while True:
        ev = events.get(timeout=60)
        if ev.kind == "text":
            parts.append(ev.text)
        else:
            return "".join(parts), ev


def test_worker_stops_at_turn_tokens_and_refuses_past_the_queue(local):
    ids = local.encode("The quality of mercy is not strained")
    gen = local.generate(ids, max_new_tokens=8, stop_at_eos=False)
    k = next(i for i in range(1, 8) if gen.tokens[i] not in gen.tokens[:i])
    worker = EngineWorker(local, max_batch=1, queue_limit=0).start()
    try:
        text, end = run_job(worker, ids, 8, stop_ids=frozenset({gen.tokens[k]}))
        assert text == local.decode(gen.tokens[:k]) and end.finish_reason == "stop" and end.completion_tokens == k + 1
        blocker = Job(ids, SamplingParams(max_new_tokens=100), emit=lambda ev: None)
        worker.submit(blocker)
        with pytest.raises(QueueFullError):
            worker.submit(Job(ids, SamplingParams(max_new_tokens=1), emit=lambda ev: None))
        deadline = time.monotonic() + 30
        while (blocker.seq is None or not blocker.seq.tokens) and time.monotonic() < deadline:
            time.sleep(0.001)  # cancel once it decodes, so that the cancel frees a sequence in flight
        worker.cancel(blocker)
        deadline = time.monotonic() + 10
        while worker.outstanding and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.outstanding == 0 and worker.engine.idle
        assert blocker.seq.cancelled and len(blocker.seq.tokens) < 100 and blocker.seq.cache is None
    finally:
        worker.stop()


def test_held_back_text():
    assert held_back("abc\nUs", ("\nUser:",)) == 3
    assert held_back("abc", ("\nUser:",)) == 0
    assert held_back("aXYX", ("XYZ",)) == 1
    assert held_back("aXYXY", ("XYXYZ",)) == 4


def test_taken_port_and_bad_options_fail_cleanly(pack):
    import socket

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = subprocess.run([sys.executable, "-m", "moepack", "serve", str(pack), "--port", str(port)],
                             capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in res.stderr
    for args, word in ((["--max-batch", "0"], "--max-batch"), (["--queue-limit", "-1"], "--queue-limit"),
                       (["--vram", "-5GB"], "--vram"), (["--cache-policy", "nope"], "--cache-policy")):
        res = subprocess.run([sys.executable, "-m", "moepack", "serve", str(pack), *args], capture_output=True,
                             text=True, timeout=60, env=env)
        assert res.returncode == 2 and word in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
