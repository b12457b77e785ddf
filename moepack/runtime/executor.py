"""The streaming expert executor: runs a layer's routed experts from the budgeted cache.

Per layer: every needed expert that is resident is pinned, every missing one gets a slot and its load is
issued at once (on CUDA they all stream while the resident ones compute), then the experts are computed
in that order, each unpinned once done so a later load may reuse its slot."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from moepack.format import Pack, projection_parts
from moepack.format.constants import PROJECTIONS
from moepack.kernels import Backend, matmul, matmul_t
from moepack.runtime.cache import ExpertCache
from moepack.runtime.streamer import Streamer

Key = tuple[int, int]


def expert_ffn(x: torch.Tensor, projs: dict, backend: Backend) -> torch.Tensor:
    """SwiGLU expert on channel-major projections: down(silu(gate(x)) * up(x)).  x [T, H] -> [T, H]."""
    g = matmul(x, *projs["gate"], backend=backend)  # [T, I]
    u = matmul(x, *projs["up"], backend=backend)  # [T, I]
    return matmul_t(F.silu(g) * u, *projs["down"], backend=backend)  # [T, H]


class StreamingExecutor:
    def __init__(self, pack: Pack, cache: ExpertCache | None, streamer: Streamer | None, *,
                 backend: Backend = Backend.AUTO):
        """With `cache=None` every expert is used in place from the mapped pack (CPU, no budget)."""
        self.pack, self.cache, self.streamer, self.backend = pack, cache, streamer, backend
        self.records = pack.expert_records
        self.pending: dict[Key, torch.cuda.Event] = {}
        self.stall_s = 0.0  # time compute waited for transfers
        self.expert_calls = 0

    def _projections(self, key: Key, blob: torch.Tensor) -> dict:
        rec = self.records[key]
        return {p: (projection_parts(blob, rec.projections[p]), rec.projections[p].recipe, rec.projections[p].shape)
                for p in PROJECTIONS}

    def ensure(self, key: Key) -> torch.Tensor:
        """The expert's blob on the compute device, issuing its load if it is not resident."""
        if self.cache is None:
            return self.pack.expert_blob(*key, verify=True)
        blob = self.cache.lookup(key)
        if blob is not None:
            return blob[: self.records[key].nbytes]
        return self.load(key)

    def load(self, key: Key) -> torch.Tensor:
        nbytes = self.records[key].nbytes
        dst = self.cache.allocate(key, nbytes)
        event = self.streamer.load(key, dst)
        if event is not None:
            self.pending[key] = event
        return dst

    def _wait(self, key: Key) -> None:
        event = self.pending.pop(key, None)
        if event is not None:
            t0 = time.perf_counter()
            if not event.query():
                event.synchronize()
                self.stall_s += time.perf_counter() - t0
            torch.cuda.current_stream().wait_event(event)

    def forward(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids/topk_weights [T, k] -> weighted sum of the routed experts' outputs [T, H]."""
        out = torch.zeros_like(x)
        experts = topk_ids.unique().tolist()
        cache = self.cache
        if cache is not None:  # resident ones first: they compute while the missing ones stream in
            experts.sort(key=lambda e: (layer, e) not in cache)
        blobs: dict[int, torch.Tensor] = {}
        for e in experts:  # pin hits and issue loads for as many misses as unpinned slots allow
            key = (layer, e)
            if cache is not None and len(cache.pinned) >= cache.slots:
                break
            blobs[e] = self.ensure(key)
            if cache is not None:
                cache.pinned.add(key)
        for e in experts:
            key = (layer, e)
            blob = blobs.pop(e, None)
            if blob is None:
                blob = self.ensure(key)
                if cache is not None:
                    cache.pinned.add(key)
            self._wait(key)
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            y = expert_ffn(x[tok], self._projections(key, blob), self.backend)
            out.index_add_(0, tok, (y * topk_weights[tok, slot, None]).to(out.dtype))
            self.expert_calls += 1
            if cache is not None:
                cache.pinned.discard(key)
        return out
