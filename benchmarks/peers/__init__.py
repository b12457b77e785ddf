"""Helpers for the peer and runtime benchmarks: a cached benchmark model and its packs (`common`), one
measurement per subprocess (`worker`), and llama.cpp's GGUF conversion and quantisation (`gguf`)."""
