"""Faces into tensors: JPEG decoding, the train / eval transforms and the training DataLoader.

Shared preprocessing (every stage that feeds a network uses these, never its own):
``decode_jpeg`` -> uint8 (3, H, W); ``eval_transform`` resizes to the model's input size;
``normalize`` turns a uint8 batch into the network's input on its device; ``preprocess`` does
all three for a list of JPEGs and a model card.

Training reads the sharded face table lazily: a ``FaceIndex`` holds only the small columns
(sample id, dataset, split, shard position) and the targets; the JPEG bytes are read a shard at a
time into a per-worker cache. By default the cache holds every shard (compressed faces: ~3.6 KB
each at 112 px, 176 MB for UTKFace + FER2013), so every batch draws from the whole table. With
``window`` = N the ``EpochSampler`` orders each epoch N shards at a time and memory stays bounded
whatever the table size; a batch then mixes only those shards, which is unbiased only when rows
are in random order across shards (ingest writes them in source order: FER2013 by class, UTKFace
by age). Each epoch's plan is a pure function of (seed, epoch), and each sample's augmentation has
its own seed, so a run resumed at any batch continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from d2mtl import contracts, store
from d2mtl.errors import UserError
from d2mtl.tasks import TASKS

# ---- shared preprocessing ----------------------------------------------------------------------


def decode_jpeg(data: bytes) -> torch.Tensor:
    """A face JPEG as uint8 (3, H, W) RGB (gray JPEGs get three equal channels)."""
    # OpenCV, not torchvision.io: torchvision 0.29 deprecates its image decoders
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if image is None:
        raise UserError("face image is not a decodable JPEG")
    return torch.from_numpy(image).permute(2, 0, 1)


def eval_transform(input_size: int) -> v2.Transform:
    """uint8 (3, H, W) -> uint8 (3, input_size, input_size): what every non-training pass applies."""
    return v2.Resize((input_size, input_size), antialias=True)


def train_transform(input_size: int, augment) -> v2.Transform:
    """uint8 (3, H, W) -> augmented uint8 (3, input_size, input_size); ``augment`` is an AugmentConfig."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                input_size, scale=tuple(augment.crop_scale), ratio=tuple(augment.crop_ratio), antialias=True
            ),
            v2.RandomHorizontalFlip(augment.hflip),
            v2.ColorJitter(
                brightness=augment.brightness, contrast=augment.contrast, saturation=augment.saturation, hue=augment.hue
            ),
            v2.RandomGrayscale(augment.grayscale),
        ]
    )


def normalize(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> normalised float32 network input on ``device``."""
    images = images.to(device, non_blocking=True)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255
    return ((images.float() - mean_t) / std_t).contiguous(memory_format=memory_format)


def preprocess(
    jpegs: Sequence[bytes],
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """JPEG bytes -> the normalised (B, 3, S, S) input of a model (its card's input_size, mean, std)."""
    resize = eval_transform(input_size)
    images = torch.stack([resize(decode_jpeg(data)) for data in jpegs])
    return normalize(images, mean, std, device)


# ---- targets -----------------------------------------------------------------------------------


def empty_targets(n: int, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """Target arrays for ``n`` rows with no label: per class task ``t`` (int64, -1 = none), ``t_weight``,
    ``t_probs`` (soft targets, used where ``t_soft``) and ``t_soft``; for age ``age_low``/``age_high``
    (NaN = none; equal for an exact age) and ``age_weight``. A weight of 0 means "no label"."""
    targets: dict[str, np.ndarray] = {}
    for task in tasks:
        if TASKS[task].kind == "classification":
            targets[task] = np.full(n, -1, np.int64)
            targets[f"{task}_probs"] = np.zeros((n, TASKS[task].num_classes), np.float32)
            targets[f"{task}_soft"] = np.zeros(n, bool)
        else:
            targets[f"{task}_low"] = np.full(n, np.nan, np.float32)
            targets[f"{task}_high"] = np.full(n, np.nan, np.float32)
        targets[f"{task}_weight"] = np.zeros(n, np.float32)
    return targets


def column_at(table: pa.Table, name: str, positions: np.ndarray) -> pa.Array:
    """``table[name]`` at ``positions``; null where the position is -1 (no row)."""
    return table.column(name).take(pa.array(positions, mask=positions < 0)).combine_chunks()


def values_at(table: pa.Table, name: str, positions: np.ndarray, fill) -> np.ndarray:
    """``column_at`` as NumPy, nulls and missing rows as ``fill``."""
    return column_at(table, name, positions).fill_null(fill).to_numpy(zero_copy_only=False)


def label_targets(labels: pa.Table, positions: np.ndarray, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    """Targets from label-table rows: row i of the result reads ``labels`` row ``positions[i]`` (-1: none).

    Age: an exact age gives the interval [age, age]; rows with only ``age_low``/``age_high`` train the age
    head through that interval.
    """
    targets = empty_targets(len(positions), tasks)
    for task in tasks:
        if TASKS[task].kind == "classification":
            codes = values_at(labels, task, positions, -1)
            targets[task] = codes.astype(np.int64)
            targets[f"{task}_weight"] = (codes >= 0).astype(np.float32)
        else:
            exact = values_at(labels, task, positions, np.nan)
            low = np.where(np.isnan(exact), values_at(labels, f"{task}_low", positions, np.nan), exact)
            high = np.where(np.isnan(exact), values_at(labels, f"{task}_high", positions, np.nan), exact)
            known = ~np.isnan(low) & ~np.isnan(high)
            targets[f"{task}_low"] = np.where(known, low, np.nan).astype(np.float32)
            targets[f"{task}_high"] = np.where(known, high, np.nan).astype(np.float32)
            targets[f"{task}_weight"] = known.astype(np.float32)
    return targets


def positions_in(keys: pa.Array, table: pa.Table, column: str = "sample_id", where: str = "table") -> np.ndarray:
    """For each key, its row in ``table`` (-1 when absent); ``table[column]`` must be unique."""
    ids = table.column(column)
    if pc.count_distinct(ids).as_py() != len(ids):
        raise contracts.ContractError(f"{where}: duplicate {column} values")
    found = pc.index_in(keys, value_set=ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids)
    return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


# ---- the face index ----------------------------------------------------------------------------


@dataclass
class FaceIndex:
    """Every face row's metadata, its place in the sharded table, and its training targets (one row per face;
    the labels of evaluation-only datasets are not training targets)."""

    faces: str  # face table URI
    shards: list[str]  # shard URIs in manifest order
    sample_id: np.ndarray  # (N,) object
    dataset: np.ndarray  # (N,) object
    split: np.ndarray  # (N,) object
    shard: np.ndarray  # (N,) int: shard number
    row: np.ndarray  # (N,) int: row within its shard
    tasks: tuple[str, ...]
    targets: dict[str, np.ndarray]
    unmatched_labels: int = 0  # label rows whose sample_id is not in the face table
    face_settings: dict = field(default_factory=dict)  # the manifest's metadata: image_size, template
    label_mismatch: str | None = None  # contracts.mismatch: faces without a label row, label rows without a face

    @classmethod
    def load(cls, faces: str, labels: str | pa.Table, tasks: Sequence[str]) -> FaceIndex:
        manifest = contracts.read_manifest(faces)
        meta = contracts.read_face_columns(faces, ["sample_id", "dataset", "split"])
        counts = [shard["rows"] for shard in manifest["shards"]]
        if sum(counts) != meta.num_rows:
            raise contracts.ContractError(f"{faces}: manifest lists {sum(counts)} rows, shards hold {meta.num_rows}")
        label_table = contracts.read_table(labels, contracts.LABELS) if isinstance(labels, str) else labels
        label_table, _ = contracts.training_labels(faces, label_table, meta)
        positions = positions_in(meta.column("sample_id"), label_table, where=str(labels)[:200])
        shard = np.repeat(np.arange(len(counts)), counts)
        row = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, np.int64)
        matched = int((positions >= 0).sum())
        return cls(
            faces=faces,
            shards=[store.join(faces, s["path"]) for s in manifest["shards"]],
            sample_id=np.asarray(meta.column("sample_id").to_pylist(), dtype=object),
            dataset=np.asarray(meta.column("dataset").to_pylist(), dtype=object),
            split=np.asarray(meta.column("split").to_pylist(), dtype=object),
            shard=shard,
            row=row,
            tasks=tuple(tasks),
            targets=label_targets(label_table, positions, tasks),
            unmatched_labels=label_table.num_rows - matched,
            face_settings=manifest.get("metadata", {}),
            label_mismatch=contracts.mismatch(
                faces,
                f"label table {labels}" if isinstance(labels, str) else "the label table",
                meta.num_rows,
                label_table.num_rows,
                matched,
            ),
        )

    def __len__(self) -> int:
        return len(self.sample_id)

    def labelled(self) -> np.ndarray:
        """(N,) bool: rows with a label (weight > 0) for at least one task."""
        return np.any([self.targets[f"{t}_weight"] > 0 for t in self.tasks], axis=0)

    def rows(self, split: str, labelled_only: bool = True) -> np.ndarray:
        """Row numbers of ``split`` (with at least one target unless ``labelled_only`` is False)."""
        mask = self.split == split
        if labelled_only:
            mask &= self.labelled()
        return np.flatnonzero(mask)

    def summary(self, rows: np.ndarray) -> dict:
        """Per dataset: rows, and labelled rows per task (for model cards and logs)."""
        out = {}
        for name in sorted(set(self.dataset[rows])):
            subset = rows[self.dataset[rows] == name]
            out[name] = {
                "rows": len(subset),
                **{t: int((self.targets[f"{t}_weight"][subset] > 0).sum()) for t in self.tasks},
            }
        return out


# ---- dataset + sampler ---------------------------------------------------------------------------


class FaceDataset(torch.utils.data.Dataset):
    """Batches of decoded, transformed faces and their targets, read through a small shard cache.

    Items are (row, seed) pairs; a seed of -1 means "eval transform", any other seeds the sample's
    augmentation, so it does not depend on which worker draws it or on what ran before.
    """

    def __init__(self, index: FaceIndex, input_size: int, augment=None, cache_shards: int = 0):
        self.index = index
        self.resize = eval_transform(input_size)
        self.augment = train_transform(input_size, augment) if augment is not None else None
        self.cache_shards = cache_shards if cache_shards > 0 else max(1, len(index.shards))  # 0: every shard
        self._cache: OrderedDict[int, pa.Array] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index)

    def _shard_images(self, shard: int) -> pa.Array:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        uri = self.index.shards[shard]
        with store.local_path(uri, ".parquet") as path:
            parquet = pq.ParquetFile(path)
            contracts.check_version(parquet.schema_arrow, contracts.FACES, uri)
            images = parquet.read(columns=["image"]).column("image").combine_chunks()
        self._cache[shard] = images
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return images

    def image(self, row: int, seed: int) -> torch.Tensor:
        data = self._shard_images(int(self.index.shard[row]))[int(self.index.row[row])].as_py()
        try:
            image = decode_jpeg(data)
        except UserError as err:
            raise UserError(f"sample {self.index.sample_id[row]}: {err}") from None
        if seed < 0 or self.augment is None:
            return self.resize(image)
        # The transforms draw from the default CPU generator: seed it for this sample, then put it back
        # (torch.manual_seed + fork_rng cost ~0.1 ms per call; the generator's own methods ~5 us).
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.augment(image)
        finally:
            generator.set_state(state)

    def __getitems__(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows = np.fromiter((r for r, _ in items), np.int64, len(items))
        batch = {"image": torch.stack([self.image(r, s) for r, s in items]), "row": torch.from_numpy(rows)}
        for key, values in self.index.targets.items():
            batch[key] = torch.from_numpy(values[rows])
        return batch

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([item]).items()}


def mix_weights(index: FaceIndex, rows: np.ndarray, mix: str, temperature: float = 1.0) -> np.ndarray:
    """Sampling weight of each row: proportional (uniform), dataset (each dataset an equal share), temperature
    (dataset d's share proportional to n_d ** (1 / temperature), as multilingual translation models sample their
    languages), task (each row the mean of 1/n_task over the tasks it labels, so sparsely labelled tasks are not
    starved)."""
    if mix == "proportional":
        return np.ones(len(rows))
    if mix in ("dataset", "temperature"):
        _names, inverse, counts = np.unique(index.dataset[rows], return_inverse=True, return_counts=True)
        share = counts ** (1.0 / temperature) if mix == "temperature" else np.ones(len(counts))
        return (share / counts)[inverse]
    if mix == "task":
        has = np.stack([index.targets[f"{t}_weight"][rows] > 0 for t in index.tasks])  # (T, R)
        per_task = 1.0 / np.maximum(has.sum(axis=1, keepdims=True), 1)
        return (has * per_task).sum(axis=0) / np.maximum(has.sum(axis=0), 1)
    raise ValueError(f"unknown mix {mix!r}; known: proportional, dataset, task, temperature")


class EpochSampler(torch.utils.data.Sampler):
    """Batch sampler: yields lists of (row, augmentation seed) for one epoch, from batch ``start`` on.

    The epoch plan draws ``samples`` rows by the mix weights (each row once when proportional and not
    oversampling), then orders them window by window: shards interleaved by dataset, ``window`` shards at
    a time (0: all of them), rows shuffled within a window. ``set_epoch(epoch, start)`` positions it (resume).

    Data-parallel: every rank draws the same plan (it depends on the seed only) and yields its own contiguous
    share of each global batch of ``batch_size`` rows, so the ranks' batches together are the batch that
    one process would train on. Positions (``start``, ``len``) count global batches.
    """

    def __init__(
        self,
        index: FaceIndex,
        rows: np.ndarray,
        batch_size: int,
        seed: int,
        mix: str = "proportional",
        samples: int | None = None,
        window: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        temperature: float = 1.0,
    ):
        self.index, self.rows, self.batch_size = index, np.asarray(rows, np.int64), batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.window = window if window > 0 else max(1, len(index.shards))
        self.samples = samples or len(self.rows)
        self.weights = torch.as_tensor(mix_weights(index, self.rows, mix, temperature), dtype=torch.float64)
        self.replacement = mix != "proportional" or self.samples > len(self.rows)
        self.epoch, self.start = 0, 0
        if not len(self.rows):
            raise UserError("no rows to sample from (the split has no labelled faces for the configured tasks)")
        if batch_size % world_size or min(batch_size, self.samples) < world_size:
            raise UserError(
                f"batch_size {batch_size} (the global batch) must be a multiple of the {world_size} "
                f"training processes, and at least {world_size} samples are needed per epoch"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        """Batches per epoch: every sample once, the last batch partial; in training that batch is dropped only when
        it has fewer than 2 rows per process (``dropped``): BatchNorm cannot train on one row of 1 x 1 features."""
        if not self.shuffle:
            return math.ceil(len(self.rows) / self.batch_size)
        full, rest = divmod(self.samples, self.batch_size)
        return max(1, full + (rest >= 2 * self.world_size))

    @property
    def dropped(self) -> int:
        """Samples of each epoch that no batch holds."""
        return max(0, self.samples - len(self) * self.batch_size) if self.shuffle else 0

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, seeds) of an epoch, in order."""
        if not self.shuffle:
            order = np.lexsort((self.index.row[self.rows], self.index.shard[self.rows]))
            return self.rows[order], np.full(len(self.rows), -1, np.int64)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.replacement:
            picked = torch.multinomial(self.weights, self.samples, replacement=True, generator=gen)
        else:
            picked = torch.randperm(len(self.rows), generator=gen)[: self.samples]
        rows = self.rows[picked.numpy()]
        shards = self.index.shard[rows]
        window_of_shard = self._shard_windows(gen)
        key = window_of_shard[shards] + torch.rand(len(rows), generator=gen, dtype=torch.float64).numpy()
        order = np.argsort(key, kind="stable")
        seeds = torch.randint(0, 2**62, (len(rows),), generator=gen).numpy()
        return rows[order], seeds

    def _shard_windows(self, gen: torch.Generator) -> np.ndarray:
        """Window number of every shard: shards interleaved across datasets (stratified random keys)."""
        n = len(self.index.shards)
        first_rows = np.searchsorted(self.index.shard, np.arange(n))
        owner = self.index.dataset[np.minimum(first_rows, len(self.index) - 1)]
        key = np.empty(n)
        for name in set(owner):
            members = np.flatnonzero(owner == name)
            ranks = torch.randperm(len(members), generator=gen).numpy()
            key[members] = (ranks + torch.rand(len(members), generator=gen, dtype=torch.float64).numpy()) / len(members)
        position = np.empty(n, np.int64)
        position[np.argsort(key, kind="stable")] = np.arange(n)
        return (position // self.window).astype(np.float64)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        rows, seeds = self.plan(self.epoch)
        count = len(self)
        for b in range(self.start, count):
            batch = np.arange(b * self.batch_size, min((b + 1) * self.batch_size, len(rows)))
            share = np.array_split(batch, self.world_size)[self.rank]
            yield list(zip(rows[share].tolist(), seeds[share].tolist(), strict=True))


def _whole_batch(batch):
    return batch


def make_loader(
    dataset: FaceDataset,
    sampler: EpochSampler,
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent: bool = False,
) -> DataLoader:
    """A DataLoader whose batches are FaceDataset.__getitems__ dicts, in the sampler's order.

    ``persistent`` keeps the workers, and so their shard caches, from one epoch to the next (position
    the sampler with ``set_epoch`` before each pass). The loader gets its own generator: the default
    one would draw from the global RNG each time an epoch starts, and a run resumed mid-epoch would
    then see other dropout masks than the uninterrupted run.
    """
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=_whole_batch,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=persistent and num_workers > 0,
        generator=torch.Generator(),
    )
