"""Moves expert blobs from the pack's shards into cache slots.

CUDA: shard -> pinned staging buffer (one positioned read) -> slot (async DMA on a side stream); two staging
buffers alternate so the read of one expert overlaps the DMA of the previous, and compute waits on a
per-load event only when it needs that expert. CPU: one positioned read straight into the slot.

Every load is checked (with `verify`, the default) against the expert's recorded checksum before the slot
is used, and reads never go through a memory map: a shard changed while a run streams from it stops the
run with a ChecksumError naming the shard, and one truncated stops it with a TruncatedError, never a SIGBUS
or a run on damaged weights (Pack.read_expert_into)."""

from __future__ import annotations

import torch

from moepack.format import Pack

Key = tuple[int, int]


class Streamer:
    def __init__(self, pack: Pack, device: torch.device, slot_bytes: int, *, verify: bool = True, buffers: int = 2):
        self.pack, self.device, self.verify = pack, torch.device(device), verify
        self.cuda = self.device.type == "cuda"
        self.loads = 0
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            self.staging = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(buffers)]
            self.staging_free: list[torch.cuda.Event | None] = [None] * buffers
            self._next = 0

    def load(self, key: Key, dst: torch.Tensor) -> torch.cuda.Event | None:
        """Copy expert `key` into `dst` (a slot view). On CUDA returns the event that marks completion."""
        self.loads += 1
        if not self.cuda:
            self.pack.read_expert_into(*key, dst, verify=self.verify)
            return None
        i = self._next
        self._next = (i + 1) % len(self.staging)
        if self.staging_free[i] is not None:
            self.staging_free[i].synchronize()  # the DMA that last read this staging buffer is done
        stage = self.pack.read_expert_into(*key, self.staging[i], verify=self.verify)
        # the slot may have held an expert whose compute is still queued on the main stream: wait for it
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            dst.copy_(stage, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.staging_free[i] = done
        return done
