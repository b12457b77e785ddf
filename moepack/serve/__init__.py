"""`moepack serve` and `moepack chat`: an OpenAI-compatible server and a terminal chat over the runtime engine.

- template.py  chat templates (transformers' apply_chat_template semantics) and end-of-turn tokens
- worker.py    the engine thread: continuous batching, stop strings, cancellation (server and chat)
- metrics.py   Prometheus counters and histograms
- protocol.py  OpenAI request models and error bodies (pydantic)
- app.py       the FastAPI routes; server.py binds the socket and runs uvicorn

Only app.py and server.py import FastAPI and uvicorn (the `serve` extra), and only when serving: the
runtime and the rest of the CLI never import this package's web side."""
