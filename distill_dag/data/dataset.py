"""Torch access to packed shards: a map-style dataset and a deterministic, resumable loader.

:class:`PackedDataset` reads one split of a tokenized_parquet directory through its manifest. It
decodes a parquet row group at a time (about 2**20 tokens) and keeps only the last few decoded,
so memory stays small whatever the corpus size.

:func:`make_loader` yields batches ``{"input_ids", "attention_mask", "labels", "position_ids":
long [B, T], "shard", "row": long [B]}`` (``shard`` = index into the manifest's shard list).
The sample order is a pure function of ``(seed, epoch)``: epochs are concatenated into one
stream and step ``s`` takes stream positions ``[s*B, (s+1)*B)``, so ``start_step=s`` resumes
exactly where a run stopped, with no sample skipped or repeated, across epoch boundaries too.
The shuffle is two-level so reads stay sequential: row groups are permuted, grouped into windows
of ``window`` row groups, and rows are permuted inside each window.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from distill_dag.data.manifest import Manifest, check_manifest
from distill_dag.data.shards import CorruptShardError, table_to_arrays
from distill_dag.io import sha256_file

_FIELDS = ("input_ids", "attention_mask", "labels", "position_ids")


class PackedDataset(Dataset):
    """Rows of one split (``"train"`` / ``"val"``); item ``i`` is a dict of long tensors ``[T]`` plus
    ``shard`` and ``row`` (long scalars). ``tokenizer_hash`` / ``max_seq_length``, when given, are
    checked against the manifest (:func:`~distill_dag.data.manifest.check_manifest`)."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", tokenizer_hash: str | None = None,
                 max_seq_length: int | None = None, cache_groups: int = 4):
        self.data_dir = Path(data_dir)
        self.manifest = Manifest.load(self.data_dir)
        check_manifest(self.manifest, tokenizer_hash, max_seq_length)
        self.split = split
        self.width = self.manifest.max_seq_length
        self.shards = self.manifest.split_shards(split)
        if not self.shards:
            raise ValueError(f"{self.data_dir}: no '{split}' shards in the manifest "
                             f"(splits present: {sorted({s.split for s in self.manifest.shards})})")
        # global row ranges of every (shard, row group): the unit of decoding and of the shuffle
        groups = []  # (global start, rows, shard position, row group, first row in shard)
        start = 0
        for pos, (_, s) in enumerate(self.shards):
            md = _shard_metadata(self.manifest.shard_path(s), s)
            if md.num_rows != s.rows:
                raise ValueError(f"{self.manifest.shard_path(s)}: {md.num_rows} rows but the manifest says {s.rows}; "
                                 "re-run preprocessing with force")
            in_shard = 0
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                groups.append((start, n, pos, g, in_shard))
                start += n
                in_shard += n
        self.groups = np.array(groups, dtype=np.int64).reshape(-1, 5)
        self.num_rows = start
        self.cache_groups = cache_groups
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers start with an empty cache
        d = dict(self.__dict__)
        d["_cache"] = OrderedDict()
        return d

    def _group(self, gi: int) -> dict[str, np.ndarray]:
        arr = self._cache.get(gi)
        if arr is None:
            _, _, pos, g, _ = self.groups[gi]
            shard = self.shards[int(pos)][1]
            if int(pos) not in self._verified:  # once per shard: a file that is not the manifest's is never read
                _verify_sha256(self.manifest.shard_path(shard), shard)
                self._verified.add(int(pos))
            table = pq.ParquetFile(self.manifest.shard_path(shard)).read_row_group(int(g), columns=list(_FIELDS))
            arr = table_to_arrays(table, self.width)
            _check_ids(arr, self.manifest.vocab_size, self.manifest.shard_path(shard), int(g))
            self._cache[gi] = arr
            while len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(gi)
        return arr

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range for {self.num_rows} rows of split '{self.split}'")
        gi = int(np.searchsorted(self.groups[:, 0], i, side="right") - 1)
        start, _, pos, _, first = self.groups[gi]
        r = int(i - start)
        arr = self._group(gi)
        item = {k: torch.from_numpy(arr[k][r].astype(np.int64)) for k in _FIELDS}
        item["shard"] = torch.tensor(self.shards[int(pos)][0], dtype=torch.long)
        item["row"] = torch.tensor(int(first) + r, dtype=torch.long)
        return item


def _check_ids(arr: dict[str, np.ndarray], vocab_size: int, path: Path, group: int) -> None:
    """Token ids must index the manifest's vocabulary (labels may also be -100, the ignore index): an id
    past it would surface as an IndexError deep in the embedding, naming no shard."""
    for name, floor in (("input_ids", 0), ("labels", -100)):
        a = arr[name]
        if not a.size or (int(a.min()) >= 0 and int(a.max()) < vocab_size):
            continue  # input_ids' common case: two reductions, no mask
        valid = (a >= 0) & (a < vocab_size)
        if floor < 0:
            valid |= a == floor
        if not valid.all():
            raise CorruptShardError(f"{path}: row group {group}: {name} holds token id {int(a[~valid].flat[0])}, "
                                    f"outside the manifest's vocabulary [0, {vocab_size}) (written with another "
                                    f"tokenizer?); {_fix()}")


def _fix() -> str:
    return "re-run preprocessing (`distill preprocess`, or tokenize.force / --force) to rebuild the shards"


def _shard_metadata(path: Path, shard: Any) -> Any:
    """The parquet footer of a shard whose size matches the manifest; a missing, truncated or replaced
    file is a :class:`CorruptShardError` naming it."""
    if not path.exists():
        raise CorruptShardError(f"{path}: missing (listed in {path.parent / 'manifest.json'}); {_fix()}")
    size = path.stat().st_size
    if size != shard.bytes:
        raise CorruptShardError(f"{path}: {size} bytes, the manifest says {shard.bytes} (truncated or replaced); {_fix()}")
    try:
        return pq.ParquetFile(path).metadata
    except Exception as err:  # noqa: BLE001 - any footer error means the file is unusable
        raise CorruptShardError(f"{path}: unreadable parquet ({err}); {_fix()}") from None


# (path, size, mtime_ns) -> sha256 of shards already checked in this process
_VERIFIED: dict[tuple[str, int, int], str] = {}


def _verify_sha256(path: Path, shard: Any) -> None:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(key) != shard.sha256:
        if sha256_file(path) != shard.sha256:
            raise CorruptShardError(
                f"{path}: sha256 differs from {path.parent / 'manifest.json'} (corrupt, or rewritten by a preprocessing "
                f"run that did not finish); {_fix()}"
            )
        _VERIFIED[key] = shard.sha256


def epoch_order(dataset: PackedDataset, seed: int, epoch: int, shuffle: bool = True, window: int = 4) -> np.ndarray:
    """The permutation of row indices for one epoch (identity when not shuffling)."""
    n = len(dataset)
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    groups = dataset.groups[rng.permutation(len(dataset.groups))]
    parts = []
    for w in range(0, len(groups), window):
        idx = np.concatenate([np.arange(s, s + k) for s, k in groups[w:w + window, :2]])
        parts.append(idx[rng.permutation(len(idx))])
    return np.concatenate(parts).astype(np.int64)


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of indices; batch ``k`` of this sampler is global step ``start_step + k``.

    ``infinite``: epochs follow one another forever (training); otherwise one pass (evaluation),
    whose last batch is short unless ``drop_last``.
    """

    def __init__(self, dataset: PackedDataset, batch_size: int, seed: int = 0, start_step: int = 0,
                 shuffle: bool = True, infinite: bool = True, drop_last: bool = False, window: int = 4):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed, self.start_step = dataset, batch_size, seed, start_step
        self.shuffle, self.infinite, self.drop_last, self.window = shuffle, infinite, drop_last, window
        self.n = len(dataset)

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite sampler has no length; stop after max_steps")
        full = self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)
        return max(0, full - self.start_step)

    def __iter__(self) -> Iterator[list[int]]:
        b = self.batch_size
        pos = self.start_step * b  # position in the concatenated stream of epochs
        epoch, off = divmod(pos, self.n)
        if not self.infinite and epoch > 0:
            return
        order = epoch_order(self.dataset, self.seed, epoch, self.shuffle, self.window)
        while True:
            batch: list[int] = []
            while len(batch) < b:
                if off == self.n:
                    if not self.infinite:
                        break
                    epoch, off = epoch + 1, 0
                    order = epoch_order(self.dataset, self.seed, epoch, self.shuffle, self.window)
                take = min(b - len(batch), self.n - off)
                batch.extend(order[off:off + take].tolist())
                off += take
            if not batch or (len(batch) < b and self.drop_last):
                return
            yield batch
            if not self.infinite and off == self.n:
                return


def make_loader(data_dir: str | os.PathLike, split: str = "train", batch_size: int = 8, seed: int = 0,
                start_step: int = 0, shuffle: bool | None = None, infinite: bool | None = None,
                drop_last: bool = False, num_workers: int = 0, tokenizer_hash: str | None = None,
                max_seq_length: int | None = None, window: int = 4) -> DataLoader:
    """A DataLoader over ``split`` whose first batch is global step ``start_step``.

    Defaults: the train split shuffles and repeats forever; any other split is one ordered pass.
    """
    train = split == "train"
    ds = PackedDataset(data_dir, split, tokenizer_hash=tokenizer_hash, max_seq_length=max_seq_length,
                       cache_groups=max(2, window))
    sampler = ResumableBatchSampler(ds, batch_size, seed, start_step, shuffle=train if shuffle is None else shuffle,
                                    infinite=train if infinite is None else infinite, drop_last=drop_last,
                                    window=window)
    return DataLoader(ds, batch_sampler=sampler, num_workers=num_workers)
