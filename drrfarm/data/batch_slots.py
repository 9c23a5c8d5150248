"""Reusable shared-memory slots for the batches DataLoader workers hand to the training process.

A batch made in a DataLoader worker normally lives in fresh shared memory: the worker creates it and faults
in every page (at 1024², 64 images: 128 MiB, about 100 ms of a worker's time per batch), the main process maps
it, copies it into pinned memory and unmaps it again. :class:`SlotRing` instead gives each worker a few slots
that stay mapped in both processes: the worker decodes a batch into a free slot and sends a small
:class:`SlotImages` token; the main process copies the images out of the slot (into pinned memory in the
DataLoader's pin thread, or into ordinary memory) and marks the slot free again.

Protocol, per slot, in a shared ``(workers, slots)`` int32 array: 0 = free, 1 = written by the worker and not yet
copied out. A worker takes the lowest free slot (allocating it on first use, or again when a batch outgrows
it) and waits while none is free, which is the back-pressure of a consumer slower than the workers. The main
process consumes batches in order and copies each out before the next is asked for, so a waiting worker only
waits for batches it made earlier: this cannot deadlock. A token the training process drops unread (the
DataLoader discards the rest of an epoch cut short) frees its slot; a token that never arrived (workers shut
down with batches in flight) is covered by each worker freeing its slots when it starts an epoch, which the
DataLoader begins only after the previous epoch's batches are drained.

This module imports torch (only :mod:`drrfarm.data.torch_datasets` uses it).
"""

from __future__ import annotations

import os
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

FREE, WRITTEN = 0, 1

# the rings this process reads from, by ring id: a token arriving from a worker finds its slot's mapping here
_RINGS: dict[str, SlotRing] = {}


@dataclass
class _Slot:
    """One worker-side slot: its shared buffer and the id the main process knows that buffer by."""

    buffer: Any  # torch.uint8 tensor in shared memory
    generation: str


@dataclass
class SlotRing:
    """``slots`` reusable shared-memory batch buffers for each of ``workers`` DataLoader workers (see the module
    docstring). Made in the training process before its workers start; each worker gets a copy with the same
    ``ring_id`` and the same shared ``state`` array."""

    workers: int
    slots: int
    ring_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: Any = None  # (workers, slots) int32 tensor in shared memory
    _mine: dict[int, _Slot] = field(default_factory=dict, repr=False)  # worker side: this worker's slots
    _mapped: dict[tuple[int, int], tuple[str, Any]] = field(default_factory=dict, repr=False)  # main side
    allocations: int = 0  # worker side: slot buffers created (a diagnostic for tests and benchmarks)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.slots < 1:
            raise ValueError(f"SlotRing needs >= 1 worker and slot, got {self.workers} x {self.slots}")
        if self.state is None:
            self.state = torch.zeros((self.workers, self.slots), dtype=torch.int32).share_memory_()

    def __getstate__(self) -> dict[str, Any]:  # a worker's copy: the shared state, no buffers
        return {"workers": self.workers, "slots": self.slots, "ring_id": self.ring_id, "state": self.state,
                "_mine": {}, "_mapped": {}, "allocations": 0}

    # ---------------------------------------------------------------------------------------------- main side

    def register(self, owner: Any) -> SlotRing:
        """Makes this ring known to this process's token decoder while ``owner`` (the DataLoader) lives."""
        _RINGS[self.ring_id] = self
        weakref.finalize(owner, _RINGS.pop, self.ring_id, None)
        return self

    def _remember(self, worker: int, slot: int, generation: str, buffer: Any) -> None:
        """Keeps the mapping of a slot's buffer, received with the first token that used it."""
        self._mapped[(worker, slot)] = (generation, buffer)

    def _mapped_buffer(self, worker: int, slot: int, generation: str) -> Any:
        known = self._mapped.get((worker, slot))
        if known is None or known[0] != generation:
            raise RuntimeError(f"batch slot {worker}/{slot} ({generation}) of ring {self.ring_id} was never "
                               "received by this process")
        return known[1]

    def release(self, worker: int, slot: int) -> None:
        self.state.numpy()[worker, slot] = FREE

    # -------------------------------------------------------------------------------------------- worker side

    def reset(self, worker: int) -> None:
        """Frees all of ``worker``'s slots: called by the worker when it starts an epoch."""
        self.state.numpy()[worker, :] = FREE

    def acquire(self, worker: int, nbytes: int, poll_s: float = 2e-4) -> tuple[int, Any, bool]:
        """Waits for a free slot of ``worker`` and takes it: (slot, its uint8 buffer of at least ``nbytes``,
        whether that buffer is new, i.e. not yet seen by the main process)."""
        flags = self.state.numpy()[worker]
        parent, waited = os.getppid(), 0.0
        while True:
            free = np.flatnonzero(flags == FREE)
            if len(free):
                break
            time.sleep(poll_s)
            waited += poll_s
            poll_s = min(2 * poll_s, 5e-3)
            if waited > 1.0:
                waited = 0.0
                if os.getppid() != parent:
                    raise RuntimeError("the training process that reads this worker's batches has exited")
        slot = int(free[0])
        flags[slot] = WRITTEN
        have = self._mine.get(slot)
        if have is not None and have.buffer.numel() >= nbytes:
            return slot, have.buffer, False
        buffer = torch.empty(0, dtype=torch.uint8)
        buffer = buffer.new(buffer._typed_storage()._new_shared(int(nbytes), device="cpu"))
        self._mine[slot] = _Slot(buffer, uuid.uuid4().hex)
        self.allocations += 1
        return slot, buffer, True

    def token(self, worker: int, slot: int, shape: tuple[int, ...], dtype: Any, new: bool) -> SlotImages:
        """The token for a batch of ``shape`` written into ``slot``: it carries the buffer only when ``new``."""
        mine = self._mine[slot]
        return SlotImages(self.ring_id, worker, slot, tuple(int(s) for s in shape), dtype, mine.generation,
                          mine.buffer if new else None)


class SlotImages:
    """A batch's images, (B, H, W), waiting in a worker's slot. :meth:`pin_memory` (called by the DataLoader's pin
    thread) and :meth:`materialize` copy them out and free the slot; nothing else may read them."""

    __slots__ = ("ring_id", "worker", "slot", "shape", "dtype", "generation", "buffer", "_ring")

    def __init__(self, ring_id: str, worker: int, slot: int, shape: tuple[int, ...], dtype: Any,
                 generation: str, buffer: Any = None) -> None:
        self.ring_id, self.worker, self.slot, self.shape, self.dtype = ring_id, worker, slot, shape, dtype
        self.generation, self.buffer, self._ring = generation, buffer, None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _arrive, (self.ring_id, self.worker, self.slot, self.shape, self.dtype, self.generation, self.buffer)

    def __len__(self) -> int:
        return self.shape[0]

    def __del__(self) -> None:  # dropped unread (an epoch cut short): the slot is free again
        ring = self._ring
        if ring is not None:
            self._ring = None
            ring.release(self.worker, self.slot)

    def _copy_out(self, pin: bool) -> Any:
        ring = self._ring
        if ring is None:
            raise RuntimeError("batch slot images can only be read in the process that owns their loader")
        try:
            buffer = ring._mapped_buffer(self.worker, self.slot, self.generation)
            n = int(np.prod(self.shape)) * self.dtype.itemsize
            out = torch.empty(self.shape, dtype=self.dtype, pin_memory=pin)
            out.copy_(buffer[:n].view(self.dtype).view(self.shape))
            return out
        finally:
            ring.release(self.worker, self.slot)
            self._ring = None

    def pin_memory(self, device: Any = None) -> Any:
        """The images copied into page-locked memory (the slot is free again)."""
        return self._copy_out(pin=True)

    def materialize(self) -> Any:
        """The images copied into ordinary memory (the slot is free again)."""
        return self._copy_out(pin=False)


def _arrive(ring_id: str, worker: int, slot: int, shape: tuple[int, ...], dtype: Any, generation: str,
            buffer: Any) -> SlotImages:
    """Unpickles a token in the training process and, the first time a buffer comes with it, keeps its mapping."""
    tok = SlotImages(ring_id, worker, slot, shape, dtype, generation, None)
    ring = _RINGS.get(ring_id)
    if ring is not None:
        tok._ring = ring
        if buffer is not None:
            ring._remember(worker, slot, generation, buffer)
    return tok


def materialize_batch(batch: Any) -> Any:
    """``batch`` (a dict from a loader's worker) with any :class:`SlotImages` copied out of its slot."""
    if isinstance(batch, dict) and any(isinstance(v, SlotImages) for v in batch.values()):
        return {k: (v.materialize() if isinstance(v, SlotImages) else v) for k, v in batch.items()}
    return batch
