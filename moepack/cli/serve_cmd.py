"""`moepack serve`: an OpenAI-compatible HTTP server over the runtime engine (moepack/serve/).

The run options (moepack/cli/options.py, shared with `run` and `chat`) become one `RunConfig` through
`configure`, planned for `--max-batch` sequences in flight (each with a KV cache of the full context). This
module imports only typer, so the CLI stays fast; the server's web stack is imported when serving."""

from __future__ import annotations

from typing import Any

from moepack.errors import ConfigError

MAX_BATCH_LIMIT = 256  # decode tokens of a step stay within the one prefill chunk of workspace the budget plans


def configure(*, sequences: int, **options: Any):
    """A RunConfig planned for `sequences` sequences in flight, from the shared run options."""
    from moepack.runtime.config import RunConfig

    return RunConfig.build(batches=1, batch_size=sequences, **options)


def check_server_options(*, max_batch: int, queue_limit: int, port: int, api_key: str | None) -> None:
    if not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ConfigError(f"--max-batch takes 1 to {MAX_BATCH_LIMIT}, not {max_batch}")
    if queue_limit < 0:
        raise ConfigError(f"--queue-limit must be 0 or more, not {queue_limit}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port takes 0 to 65535 (0: any free port), not {port}")
    if api_key is not None and not api_key.strip():
        raise ConfigError("--api-key is empty")


def run(pack: str, config, *, host: str, port: int, max_batch: int, queue_limit: int, api_key: str | None,
        name: str | None) -> None:
    from moepack.serve.server import serve
    from moepack.source import resolve_pack

    serve(resolve_pack(pack), config, host=host, port=port, max_batch=max_batch, queue_limit=queue_limit,
          api_key=api_key, name=name)
