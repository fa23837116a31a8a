"""Training data: an unlabeled image pool, a multi-view dataset, its sampler and collate.

The pool is local folders, object-store prefixes and procedurally generated
images, addressed by one integer index each. A *key* ``epoch * N + index``
names one draw of an image; the views of a draw are a pure function of
(seed, key), so a run is reproducible whatever the number of DataLoader
workers or processes, and a resumed run sees the batches it would have seen.

Decoding and augmentation run in DataLoader workers (``TrainDataset``);
mixup / cutmix run in the workers too, in ``MultiViewCollate``. A batch
carries, per view, the indices of the pool images whose content it holds
(one, or two for a mixed view, ``-1`` padding): views sharing an index are
positives for the loss.

Training never reads an evaluation image: :func:`validation_hashes` lists
the sha256 of a validation set's references and queries, and a pool given
them refuses, before training, any local file with one of those contents or
lying in those folders, and refuses any other image with one of them as it
is read (object-store keys are not read ahead of training).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from moderation.errors import ModerationError
from moderation.images import IMAGE_SUFFIXES, decode_image, list_image_files, sha256_hex, to_tensor
from trainer.augment import Augmenter, Context
from trainer.synthetic import synthetic_image


@dataclass(frozen=True)
class PoolItem:
    """One training image: ``kind`` is ``file``, ``store`` or ``generated``."""

    kind: str
    location: str  # path, object key, or the generated image's number


EVALUATION_FOLDERS = ("references", "queries")


def validation_hashes(val_dir: str | Path) -> dict[str, str]:
    """sha256 -> path of every image of a validation set's references and queries (training must not read them)."""
    out: dict[str, str] = {}
    for sub in EVALUATION_FOLDERS:
        folder = Path(val_dir) / sub
        if folder.is_dir():
            for path in list_image_files(folder):
                out.setdefault(sha256_hex(path.read_bytes()), str(path))
    return out


class ImagePool:
    """The unlabeled training images. Picklable: workers open their own store client.

    ``excluded`` maps the sha256 of images training must never read (a
    validation set's references and queries) to where they are; reading one
    raises ModerationError.
    """

    def __init__(self, items: Sequence[PoolItem], settings=None, seed: int = 0, max_side: int = 384,
                 excluded: dict[str, str] | None = None):
        if not items:
            raise ModerationError("no training images: give --images FOLDER, --images-prefix PREFIX "
                                  "or --generated N")
        self.items = list(items)
        self.settings = settings
        self.seed = seed
        self.max_side = max_side
        self.excluded = dict(excluded or {})
        self._store = None

    @classmethod
    def build(cls, folders: Sequence[str] = (), prefixes: Sequence[str] = (), generated: int = 0,
              settings=None, seed: int = 0, max_side: int = 384,
              excluded: dict[str, str] | None = None) -> ImagePool:
        """Collect files under ``folders``, keys under ``prefixes`` and ``generated`` synthetic images.

        With ``excluded`` (:func:`validation_hashes`), raises ModerationError
        if a folder is, holds or lies in a folder of an excluded image, or a
        file has an excluded content.
        """
        items: list[PoolItem] = []
        for folder in folders:
            files = list_image_files(Path(folder))
            if excluded:
                _refuse_evaluation_images(Path(folder), files, excluded)
            items += [PoolItem("file", str(p)) for p in files]
        if prefixes:
            if settings is None:
                raise ModerationError("object-store training prefixes need settings")
            from moderation.store import open_store

            store = open_store(settings)
            for prefix in prefixes:
                items += [PoolItem("store", k) for k in store.list(prefix)
                          if k.lower().endswith(IMAGE_SUFFIXES)]
        items += [PoolItem("generated", str(i)) for i in range(generated)]
        return cls(items, settings, seed, max_side, excluded)

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for it in self.items:
            out[it.kind] = out.get(it.kind, 0) + 1
        return out

    def load(self, index: int) -> Image.Image:
        """The RGB image at ``index``, shrunk so its long side is at most ``max_side``.

        A file that no longer decodes is replaced by a generated image (and
        the run goes on): one bad file must not stop hours of training.
        """
        item = self.items[index]
        if item.kind == "generated":
            img = synthetic_image(int(item.location), self.seed, self.max_side)
        else:
            try:
                data = self._read(item)
            except Exception:
                data = None
            if data is not None and self.excluded:
                self._check_not_excluded(item.location, data)
            try:
                img = decode_image(data) if data is not None else None
            except Exception:
                img = None
            if img is None:
                img = synthetic_image(10_000_000 + index, self.seed, self.max_side)
        if max(img.size) > self.max_side:
            img = img.copy()
            img.thumbnail((self.max_side, self.max_side), Image.BILINEAR)
        return img

    def _check_not_excluded(self, location: str, data: bytes) -> None:
        found = self.excluded.get(sha256_hex(data))
        if found is not None:
            raise ModerationError(f"training image {location} is the evaluation image {found}: training "
                                  "must never read the validation set's references or queries")

    def _read(self, item: PoolItem) -> bytes:
        if item.kind == "file":
            return Path(item.location).read_bytes()
        if self._store is None:
            from moderation.store import open_store

            self._store = open_store(self.settings)
        return self._store.get(item.location)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None  # each worker opens its own connection
        return state


def _refuse_evaluation_images(folder: Path, files: Sequence[Path], excluded: dict[str, str]) -> None:
    root = folder.resolve()
    for where in {str(Path(p).resolve().parent) for p in excluded.values()}:
        inside = Path(where)
        if root == inside or root in inside.parents or inside in root.parents:
            raise ModerationError(f"training folder {folder} overlaps the evaluation folder {where}: training "
                                  "must never read the validation set's references or queries")
    for path in files:
        found = excluded.get(sha256_hex(path.read_bytes()))
        if found is not None:
            raise ModerationError(f"training image {path} is the evaluation image {found}: training must "
                                  "never read the validation set's references or queries")


def view_rng(seed: int, key: int, view: int) -> random.Random:
    """The random stream of one view of one draw (independent of workers and ranks)."""
    return random.Random(hash((seed, key, view)) & (2**63 - 1))


class TrainDataset(Dataset):
    """``dataset[key]`` -> (views (V, 3, S, S) float tensor, pool index, key).

    ``anchor`` (optional) augments view 0 instead of ``augmenter``: a
    lightly edited anchor mimics the clean reference a copy is matched to.
    """

    def __init__(self, pool: ImagePool, augmenter: Augmenter, views: int = 2, seed: int = 0,
                 anchor: Augmenter | None = None):
        if views < 2:
            raise ModerationError("SSCD needs at least 2 views per image (the positives)")
        self.pool, self.augmenter, self.views, self.seed = pool, augmenter, views, seed
        self.anchor = anchor

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, key: int):
        index = key % len(self.pool)
        img = self.pool.load(index)
        out = []
        for v in range(self.views):
            rng = view_rng(self.seed, key, v)
            ctx = Context(other=lambda rng=rng: self.pool.load(_other_index(rng, index, len(self.pool))))
            aug = self.anchor if v == 0 and self.anchor is not None else self.augmenter
            out.append(to_tensor(aug(img, rng, ctx)))
        return torch.stack(out), index, key


def _other_index(rng: random.Random, index: int, n: int) -> int:
    if n < 2:
        return index
    j = rng.randrange(n - 1)
    return j + 1 if j >= index else j


class StepBatchSampler(Sampler[list[int]]):
    """Batches of keys for steps ``start_step .. total_steps - 1`` of one process.

    Step ``s`` uses epoch ``s // steps_per_epoch`` of a seeded permutation of
    the pool, slice ``s % steps_per_epoch``; the global batch of
    ``batch_size`` images is split into ``world_size`` equal, contiguous
    parts and this process gets part ``rank``. The last incomplete batch of
    an epoch is dropped, so no image appears twice in one global batch.
    """

    def __init__(self, n: int, batch_size: int, total_steps: int, start_step: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ModerationError(f"batch size {batch_size} is not divisible by {world_size} processes")
        if batch_size > n:
            raise ModerationError(f"batch size {batch_size} exceeds the {n} training images")
        self.n, self.batch_size, self.total, self.start = n, batch_size, total_steps, start_step
        self.seed, self.rank, self.world = seed, rank, world_size
        self.steps_per_epoch = n // batch_size

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def global_batch(self, step: int) -> list[int]:
        epoch, b = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng((self.seed, epoch)).permutation(self.n)
        idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
        return [int(epoch * self.n + i) for i in idx]

    def __iter__(self) -> Iterator[list[int]]:
        part = self.batch_size // self.world
        for step in range(self.start, self.total):
            keys = self.global_batch(step)
            yield keys[self.rank * part:(self.rank + 1) * part]


@dataclass
class Batch:
    """Images (N, 3, S, S) and, per row, the pool indices it contains ((N, 2), -1 = none)."""

    images: torch.Tensor
    instances: torch.Tensor
    keys: list[int]  # the draws (epoch * N + index) of the batch's images

    def pin_memory(self):
        self.images = self.images.pin_memory()
        return self


class MultiViewCollate:
    """Stack views image-major and apply mixup / cutmix to a fraction of them.

    A mixed view draws its second image from a view of *another* image of
    the same local batch (before mixing), with mixing weight
    ``gamma ~ Beta(2, 2)`` (SSCD: alpha = 2 avoids trivial mixes); it then
    holds both images' content and is a positive of both.
    """

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0, seed: int = 0):
        self.mixup, self.cutmix, self.seed = mixup, cutmix, seed

    def __call__(self, items) -> Batch:
        views = torch.cat([v for v, _, _ in items])  # (B*V, 3, S, S), image-major
        per = items[0][0].shape[0]
        inst = torch.full((views.shape[0], 2), -1, dtype=torch.long)
        inst[:, 0] = torch.tensor([idx for _, idx, _ in items]).repeat_interleave(per)
        keys = [key for _, _, key in items]
        if (self.mixup > 0 or self.cutmix > 0) and len(items) > 1:
            views = self._mix(views, inst, per, keys)
        return Batch(views, inst, keys)

    def _mix(self, views: torch.Tensor, inst: torch.Tensor, per: int, keys: list[int]) -> torch.Tensor:
        rng = np.random.default_rng((self.seed, 7919, *keys[:8], len(keys)))
        source = views.clone()
        n = views.shape[0]
        size = views.shape[-1]
        for j in range(n):
            u = rng.random()
            if u >= self.mixup + self.cutmix:
                continue
            k = int(rng.integers(n - per))  # a view of another image: skip this image's block
            own_start = (j // per) * per
            k = k + per if k >= own_start else k
            gamma = float(rng.beta(2.0, 2.0))
            if u < self.mixup:
                views[j] = gamma * source[j] + (1 - gamma) * source[k]
            else:
                cut = int(round(size * np.sqrt(1 - gamma)))
                y, x = int(rng.integers(0, size - cut + 1)), int(rng.integers(0, size - cut + 1))
                views[j, :, y:y + cut, x:x + cut] = source[k, :, y:y + cut, x:x + cut]
            inst[j, 1] = inst[k, 0]
        return views


def worker_init(_worker_id: int) -> None:
    # Workers decode and augment; one intra-op thread each keeps them from
    # fighting the training process for the cores.
    torch.set_num_threads(1)
