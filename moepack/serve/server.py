"""Start the server: load the pack, start the engine thread, bind the socket, run uvicorn until Ctrl-C.

Memory: the budget (`--vram`) is planned for `max_batch` sequences, each with a KV cache of the full context,
and one prefill chunk of workspace; the engine never holds more. Beyond the budget the process needs a host
allowance: the Python, torch and tokenizer runtime, and per request in the batch or the
queue its token ids and text (bounded by the context) and one HTTP connection; the number of connections is
capped (`max_batch + queue_limit + CONNECTION_SLACK`, more get 503 from uvicorn), so the allowance does not
grow with the load."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from moepack.errors import MoepackError

CONNECTION_SLACK = 32  # connections beyond the batch and the queue (health checks, metrics, requests refused)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a MoepackError naming the address (in use, no such host, no permission)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MoepackError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise MoepackError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(path: str | Path, config, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 1,
          queue_limit: int = 16, api_key: str | None = None, name: str | None = None,
          announce=None) -> None:
    """Load the pack at `path` with `config` (a RunConfig planned for `max_batch` sequences) and serve it."""
    try:
        import uvicorn

        from moepack.serve.app import build_state, create_app
    except ImportError as exc:
        raise MoepackError(f"moepack serve needs the 'serve' extra (pip install 'moepack[serve]'): {exc}") from None
    from moepack.runtime.api import MoePackModel
    from moepack.serve.metrics import Metrics
    from moepack.serve.worker import EngineWorker

    say = announce or (lambda msg: print(msg, file=sys.stderr, flush=True))
    sock = bind(host, port)  # before loading: a taken port fails at once
    model = MoePackModel.load(path, config)
    name = name or Path(path).name.removesuffix(".moepack")
    metrics = Metrics(name)
    worker = EngineWorker(model, max_batch=max_batch, queue_limit=queue_limit, metrics=metrics)
    state = build_state(model, name=name, worker=worker, metrics=metrics, api_key=api_key)
    app = create_app(state)
    uv = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                        limit_concurrency=max_batch + queue_limit + CONNECTION_SLACK)
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # Ctrl-C / SIGTERM: end the answers in flight first, so
            worker.begin_stop()  # their connections close and the graceful shutdown does not wait on them
            super().handle_exit(sig, frame)

    server = Server(uv)
    actual = sock.getsockname()[1]
    if model.budget is not None:
        say(f"budget: {model.budget.describe()}")
    template = "plain fallback" if state.template.plain else "the pack's chat template"
    say(f"serving {name} on http://{host}:{actual}/v1 (batch {max_batch}, queue {queue_limit}, context "
        f"{model.context} tokens, {template}){'; API key required' if api_key else ''}")
    worker.start()
    try:
        server.run(sockets=[sock])
    finally:
        worker.stop()
        sock.close()
