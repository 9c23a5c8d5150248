"""Plain PyTorch datasets over a drrfarm dataset's committed Parquet shards (pyarrow only, no Ray):
:class:`DrrTorchDataset` (map-style), :class:`RowGroupSampler` and :class:`DrrIterableDataset` (streaming).

This module imports torch; :mod:`drrfarm.data` hands its classes on when they are first used, so that Ray Data
workers that only decode never import torch.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler

from drrfarm.data.batch_slots import SlotRing, materialize_batch
from drrfarm.data.columns import IMAGE, decode_pixel_column
from drrfarm.data.filters import FilterSpec
from drrfarm.data.index import DrrIndex
from drrfarm.errors import StorageError
from drrfarm.sinks.parquet import IMAGE_CODEC_COLUMN, IMAGE_DTYPES, binary_cells, decode_cell_into
from drrfarm.sinks.store import Store


def _to_torch_row(row: dict[str, Any]) -> dict[str, Any]:
    img = row[IMAGE]
    row[IMAGE] = torch.from_numpy(img) if isinstance(img, np.ndarray) else img
    return row


def _torch_dtype(stored: str, float_line_integral: bool) -> Any:
    return torch.float32 if float_line_integral else {"uint16": torch.uint16, "float16": torch.float16,
                                                      "float32": torch.float32}[stored]


def _batch_tensor(shape: tuple[int, ...], dtype: Any) -> Any:
    """An uninitialised tensor for a batch: in shared memory inside a DataLoader worker (as default_collate
    allocates its batches), so that handing it to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is not None:
        try:
            proto = torch.empty(0, dtype=dtype)
            storage = proto._typed_storage()._new_shared(int(np.prod(shape)), device="cpu")
            return proto.new(storage).resize_(*shape)
        except (AttributeError, RuntimeError):  # pragma: no cover - a torch without the private helper
            pass
    return torch.empty(shape, dtype=dtype)


def _meta_to_torch(values: np.ndarray) -> Any:
    """A batch's metadata column as default_collate would give it: a tensor, or a list of str."""
    if values.dtype == object:
        return values.tolist()
    return torch.from_numpy(np.ascontiguousarray(values))


class _TorchBatcher:
    """Fills batches of a torch dataset row by row: each image decoded straight into the batch tensor (no per-row
    arrays, no collate copy), float line integrals multiplied on the way; a batch ends at ``batch_size`` rows or
    where the image shape/dtype changes (datasets mixing sweeps). With a ``ring`` (in a loader's worker
    ``worker``), batches are written into its reusable slots and their images handed on as slot tokens."""

    def __init__(self, index: DrrIndex, batch_size: int, ring: SlotRing | None = None, worker: int = 0) -> None:
        self.index = index
        self.batch_size = int(batch_size)
        self.ring, self.worker = ring, worker
        self.slot: tuple[int, bool] | None = None  # with a ring: (slot, its buffer is new)
        self.tensor: Any = None
        self.view: np.ndarray | None = None
        self.key: tuple[int, int, str] | None = None
        self.rows: list[int] = []
        self.pixels: dict[str, list[np.ndarray]] = {}
        self.scratch: np.ndarray | None = None

    def add_table(self, tab: Any, positions: np.ndarray, rows: np.ndarray) -> Iterator[dict[str, Any]]:
        """Adds rows ``positions`` of a row group's table (``rows``: their dataset indices), in that order; yields
        every batch that fills up. The table's cells are read where they are (no ``take`` copy)."""
        n = tab.num_rows
        cells = binary_cells(tab.column(IMAGE))
        codecs = tab.column(IMAGE_CODEC_COLUMN).to_pylist() if IMAGE_CODEC_COLUMN in tab.column_names else [None] * n
        hs = np.asarray(tab.column("height").to_numpy(zero_copy_only=False)).tolist()
        ws = np.asarray(tab.column("width").to_numpy(zero_copy_only=False)).tolist()
        dts = tab.column("image_dtype").to_pylist()
        scales = np.asarray(tab.column("image_scale").cast("float64").to_numpy(zero_copy_only=False), np.float64)
        pixels = {c: decode_pixel_column(tab.take(positions), c) for c in self.index.pixel_columns} \
            if self.index.pixel_columns else {}
        flt = self.index.float_line_integral
        for i, j in enumerate(positions.tolist()):
            if hs[j] is None or ws[j] is None or dts[j] not in IMAGE_DTYPES:
                raise StorageError(f"image row {int(rows[i])} without height/width/image_dtype: not a drrfarm shard?")
            key = (int(hs[j]), int(ws[j]), str(dts[j]))
            if self.key is not None and key != self.key:
                yield self.finish()
            if self.tensor is None:
                self.key = key
                self.tensor = self._new_batch((self.batch_size, key[0], key[1]), _torch_dtype(key[2], flt))
                self.view = self.tensor.numpy()
            k = len(self.rows)
            stored = np.dtype(IMAGE_DTYPES[key[2]])
            if flt:
                if self.scratch is None or self.scratch.shape != key[:2] or self.scratch.dtype != stored:
                    self.scratch = np.empty(key[:2], stored)
                decode_cell_into(cells[j], codecs[j], stored, self.scratch, int(rows[i]))
                s = scales[j] if np.isfinite(scales[j]) else 1.0
                np.multiply(self.scratch, np.float32(s), out=self.view[k], dtype=np.float32)
            else:
                decode_cell_into(cells[j], codecs[j], stored, self.view[k], int(rows[i]))
            self.rows.append(int(rows[i]))
            for c, a in pixels.items():
                self.pixels.setdefault(c, []).append(a[i])
            if len(self.rows) == self.batch_size:
                yield self.finish()

    def _new_batch(self, shape: tuple[int, int, int], dtype: Any) -> Any:
        if self.ring is None:
            return _batch_tensor(shape, dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        slot, buffer, new = self.ring.acquire(self.worker, nbytes)
        self.slot = (slot, new)
        return buffer[:nbytes].view(dtype).view(shape)

    def finish(self) -> dict[str, Any]:
        """The batch collected so far (``image`` (b, H, W), metadata columns as tensors / lists of str; with a
        ring, ``image`` is the slot's token)."""
        b = len(self.rows)
        idx = np.asarray(self.rows, np.int64)
        if self.ring is not None and self.slot is not None:
            image: Any = self.ring.token(self.worker, self.slot[0], (b, *self.tensor.shape[1:]), self.tensor.dtype,
                                         self.slot[1])
            self.slot = None
        else:
            image = self.tensor[:b] if b < self.batch_size else self.tensor
        out: dict[str, Any] = {IMAGE: image}
        for c, arr in self.index.meta.items():
            out[c] = _meta_to_torch(arr[idx])
        for c, parts in self.pixels.items():
            out[c] = torch.from_numpy(np.stack(parts))
        self.tensor = self.view = self.key = None
        self.rows, self.pixels = [], {}
        return out

    @property
    def pending(self) -> int:
        return len(self.rows)



class SlotLoader(torch.utils.data.DataLoader):
    """The DataLoader of :meth:`DrrIterableDataset.loader` when batches come in reusable slots: images the pin
    thread has not already copied out of their slot are copied out here, so every batch holds plain tensors."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for batch in super().__iter__():
            yield materialize_batch(batch)


class DrrTorchDataset(Dataset):
    """Map-style PyTorch dataset over a drrfarm dataset's committed Parquet shards (pyarrow only, no Ray).

    ``ds[i]`` is a dict: ``image`` (H, W) torch tensor (stored dtype, or float32 with
    ``float_line_integral``), metadata as numpy scalars/arrays and ``str`` (see
    :mod:`drrfarm.data`); ``torch.utils.data.default_collate`` batches it. Metadata of every row is
    read and decoded once at construction (no pixels); images are read one row group at a time,
    with an LRU cache of ``cache_row_groups`` row groups -- shuffle with :meth:`sampler` (random
    row-group order, random order inside each) rather than a fully random permutation, which would
    read one row group per image. ``volume_ids`` keeps those volumes only (see :func:`~drrfarm.data.volume_split`).
    """

    def __init__(
        self,
        url: str | Store,
        columns: Sequence[str] | str | None = "all",
        *,
        filter: FilterSpec | None = None,  # noqa: A002
        volume_ids: Iterable[str] | None = None,
        float_line_integral: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        transform: Any = None,
        cache_row_groups: int = 2,
    ) -> None:
        self.index = DrrIndex(url, columns, filter, volume_ids, float_line_integral, storage_options,
                               cache_row_groups)
        self.transform = transform

    def __len__(self) -> int:
        return self.index.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        g, pos = self.index.locate(int(i))
        tab = self.index.read_group(g)
        row = self.index.row(int(i) % self.index.n, self.index.image_of(tab, pos))
        row.update(self.index.pixels_of(tab, pos))
        row = _to_torch_row(row)
        return self.transform(row) if self.transform is not None else row

    @property
    def file_metadata(self) -> dict[str, str]:
        return dict(self.index.file_metadata)

    def metadata(self, column: str) -> np.ndarray:
        """One metadata column for every row (numpy; see :mod:`drrfarm.data`), without reading pixels."""
        return self.index.meta[column]

    def sampler(self, shuffle: bool = True, seed: int = 0) -> RowGroupSampler:
        """A sampler visiting row groups one at a time (shuffled per epoch with ``shuffle``)."""
        return RowGroupSampler(self, shuffle=shuffle, seed=seed)

class RowGroupSampler(Sampler):
    """Indices of a :class:`DrrTorchDataset` grouped by row group: row groups in random order, rows
    in random order inside each (``shuffle``), so the dataset's row-group cache is hit. Call
    :meth:`set_epoch` for a new order each epoch (seeded by ``seed`` and the epoch)."""

    def __init__(self, dataset: DrrTorchDataset, shuffle: bool = True, seed: int = 0) -> None:
        self.index = dataset.index
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.index.n

    def __iter__(self) -> Iterator[int]:
        groups = list(range(len(self.index.groups)))
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.shuffle:
            rng.shuffle(groups)
        for gi in groups:
            g = self.index.groups[gi]
            order = np.arange(len(g.rows))
            if self.shuffle:
                rng.shuffle(order)
            yield from (g.first + int(k) for k in order)

class DrrIterableDataset(IterableDataset):
    """Iterable PyTorch dataset streaming a drrfarm dataset row group by row group (pyarrow only).

    Row groups are split round-robin across distributed ranks (``rank``/``world_size``, default
    from ``torch.distributed`` when initialised) and then across DataLoader workers, so each row is
    served once per epoch overall (with fewer row groups than workers, row groups are split into parts of
    rows). With ``shuffle``, row-group order and row order inside each group are shuffled, seeded by
    ``seed`` and the epoch (:meth:`set_epoch`).

    Items: with ``batch_size`` None, one dict per row, as :class:`DrrTorchDataset`'s (batch them with the
    DataLoader's ``batch_size``); with ``batch_size``, ready batches -- ``image`` (B, H, W) decoded straight
    into the batch tensor (in shared memory in a worker; :meth:`loader` reuses that memory batch after batch),
    metadata as tensors and strings as lists, like ``default_collate`` would make them, at a fraction of its
    cost. Use those with :meth:`loader` or ``DataLoader(ds, batch_size=None, ...)``; the
    last batch of each worker may be short (``drop_last`` drops it), and ``transform`` gets whole batches.
    """

    def __init__(
        self,
        url: str | Store,
        columns: Sequence[str] | str | None = "all",
        *,
        filter: FilterSpec | None = None,  # noqa: A002
        volume_ids: Iterable[str] | None = None,
        float_line_integral: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        transform: Any = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size!r}")
        self.index = DrrIndex(url, columns, filter, volume_ids, float_line_integral, storage_options, 1)
        self.transform = transform
        self.shuffle = shuffle
        self.seed = int(seed)
        # the epoch in shared memory: DataLoader workers kept between epochs (persistent_workers, the default of
        # loader()) hold copies of this dataset made when they started, and read the epoch from here
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self.rank = rank
        self.world_size = world_size
        self.batch_size = None if batch_size is None else int(batch_size)
        self.drop_last = bool(drop_last)
        self._ring: SlotRing | None = None  # set on the copy a loader() hands to its workers

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass (its shuffle), also for the workers of a DataLoader already running."""
        self._epoch[0] = int(epoch)

    def __len__(self) -> int:  # rows over all ranks/workers (a hint for progress bars)
        return self.index.n

    def loader(self, num_workers: int | None = None, *, pin_memory: bool | None = None,
               prefetch_factor: int = 4, reuse_shared_memory: bool = True,
               **kwargs: Any) -> torch.utils.data.DataLoader:
        """A DataLoader serving this dataset's batches (needs ``batch_size``): ``num_workers`` defaults to the
        CPUs this process may use, at most one per row group; ``pin_memory`` to whether CUDA is available.

        With workers, ``reuse_shared_memory`` and no ``transform``, each worker decodes its batches into a few
        shared-memory slots that stay mapped (:mod:`drrfarm.data.batch_slots`), and the images are copied out of
        them in the training process (into pinned memory with ``pin_memory``), instead of every batch going
        through fresh shared memory; the batches are the same."""
        if self.batch_size is None:
            raise ValueError("loader() serves ready batches: construct the dataset with batch_size=...")
        if num_workers is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            num_workers = max(0, min(cpus, len(self.index.groups)))
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        extra = {"prefetch_factor": prefetch_factor, "persistent_workers": kwargs.pop("persistent_workers", True)} \
            if num_workers > 0 else {}
        if num_workers == 0 or not reuse_shared_memory or self.transform is not None:
            return torch.utils.data.DataLoader(self, batch_size=None, num_workers=num_workers,
                                               pin_memory=pin_memory, **extra, **kwargs)
        served = copy.copy(self)
        served._ring = SlotRing(num_workers, prefetch_factor + 1)
        loader = SlotLoader(served, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **extra,
                            **kwargs)
        served._ring.register(loader)
        return loader

    def _place(self) -> tuple[int, int]:
        """(slot of this worker, number of slots) over ranks x DataLoader workers."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank, world = dist.get_rank(), dist.get_world_size()
            else:
                rank, world = 0, 1
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def _my_units(self) -> list[tuple[int, np.ndarray]]:
        """This worker's share of the epoch: (row group, positions of its kept rows in serving order)."""
        slot, slots = self._place()
        groups = self.index.groups
        order = list(range(len(groups)))
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        parts = 1 if len(order) >= slots else -(-slots // max(1, len(order)))
        units: list[tuple[int, np.ndarray]] = []
        for gi in order:
            n = len(groups[gi].rows)
            ks = np.random.default_rng([self.seed, self.epoch, 2, gi]).permutation(n) if self.shuffle \
                else np.arange(n)
            units += [(gi, part) for part in np.array_split(ks, min(parts, n)) if len(part)]
        return units[slot::slots]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batch_size is not None:
            yield from self._batches()
            return
        for gi, ks in self._my_units():
            g = self.index.groups[gi]
            imgs = self.index.group_images(g, ks)
            pixels = self.index.group_pixels(g, ks)
            for j, k in enumerate(ks):
                row = self.index.row(g.first + int(k), np.array(imgs[j]))
                row.update({c: np.array(a[j]) for c, a in pixels.items()})
                row = _to_torch_row(row)
                yield self.transform(row) if self.transform is not None else row

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        ring = self._ring if info is not None and self.transform is None else None
        if ring is not None:
            ring.reset(info.id)  # the loader drained the last epoch's batches before this one began
        batcher = _TorchBatcher(self.index, int(self.batch_size or 1), ring, info.id if ring is not None else 0)
        for gi, ks in self._my_units():
            g = self.index.groups[gi]
            for batch in batcher.add_table(self.index.read_group(g), g.rows[ks], g.first + ks):
                yield self.transform(batch) if self.transform is not None else batch
        if batcher.pending and not self.drop_last:
            batch = batcher.finish()
            yield self.transform(batch) if self.transform is not None else batch
