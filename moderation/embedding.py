"""Batched descriptor inference over an image source, with a vector cache.

Decoding and preprocessing run in DataLoader workers; the model runs under
``torch.inference_mode`` on the CPU or a GPU. Each image is identified by
its id and the sha256 of its bytes. Vectors are cached per model version by
sha256 in the object store (:mod:`moderation.vector_cache`), so a nightly
rerun embeds only new or changed images, and several workers (or Airflow
mapped tasks) share one cache.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moderation.config import ResizeMode, Settings
from moderation.errors import BadImageError, BatchFailedError
from moderation.images import (Failure, ImageRef, decode_image, image_id_from, list_image_entries,
                               normalise_batch, preprocess_uint8, read_image_file, sha256_hex)
from moderation.pdq import PdqHash, add_hashes, safe_pdq
from moderation.store import ObjectStore
from moderation.vector_cache import VectorCache  # noqa: F401 (its old home; callers import it from here)

log = logging.getLogger(__name__)


class ImageSource(Protocol):
    """Where images come from. Must be picklable (DataLoader workers read through it)."""

    def refs(self) -> list[ImageRef]: ...

    def read(self, location: str) -> bytes: ...


@dataclass(frozen=True)
class FolderSource:
    """Image files under a local folder; ids are file stems.

    Never leaves the folder: links, FIFOs and devices are listed so that each
    is recorded as a failure with its reason, never read
    (:func:`moderation.images.read_image_file`); a file larger than
    ``max_bytes`` is refused from its size, before it is read.
    """

    root: Path
    max_bytes: int | None = None

    def refs(self) -> list[ImageRef]:
        return [ImageRef(image_id_from(p.name), str(p)) for p in list_image_entries(Path(self.root))]

    def read(self, location: str) -> bytes:
        return read_image_file(Path(self.root), Path(location), self.max_bytes)

    def listed(self) -> list[ImageRef]:
        """:meth:`refs` with each file's fingerprint from ``lstat`` (size, mtime in ns); nothing is read.

        Links and other non-files get no fingerprint: they are always "read"
        (which records their failure).
        """
        out = []
        for path in list_image_entries(Path(self.root)):
            try:
                st = os.lstat(path)
                fingerprint = f"{st.st_size}:mtime_ns={st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else ""
            except OSError:  # vanished since the walk
                fingerprint = ""
            out.append(ImageRef(image_id_from(path.name), str(path), fingerprint=fingerprint))
        return out


@dataclass(frozen=True)
class StoreSource:
    """Objects under a prefix of the object store; ids are key stems.

    Holds the settings rather than a client so that each worker process
    opens its own connection.
    """

    settings: Settings
    prefix: str
    keys: tuple[str, ...] | None = None  # a shard: only these keys

    def refs(self) -> list[ImageRef]:
        from moderation.images import IMAGE_SUFFIXES
        from moderation.store import open_store

        keys = self.keys if self.keys is not None else [
            k for k in open_store(self.settings).list(self.prefix) if k.lower().endswith(IMAGE_SUFFIXES)]
        return [ImageRef(image_id_from(k), k) for k in keys]

    def listed(self) -> list[ImageRef]:
        """:meth:`refs` with each object's fingerprint (size and ETag) from one listing; nothing is read."""
        from moderation.images import IMAGE_SUFFIXES
        from moderation.store import open_store

        wanted = None if self.keys is None else set(self.keys)
        found = {e.key: e for e in open_store(self.settings).entries(self.prefix)
                 if e.key.lower().endswith(IMAGE_SUFFIXES) and (wanted is None or e.key in wanted)}
        keys = self.keys if self.keys is not None else sorted(found)
        return [ImageRef(image_id_from(k), k, fingerprint=found[k].fingerprint if k in found else "")
                for k in keys]

    def read(self, location: str) -> bytes:
        """The object's bytes; BadImageError ``too_large_file`` from its size, before it is fetched."""
        store = _worker_store(self.settings)
        size = store.size(location)
        if size > self.settings.max_file_bytes:
            raise BadImageError("too_large_file", f"{size} bytes > limit {self.settings.max_file_bytes}")
        return store.get(location)


_STORES: dict[str, ObjectStore] = {}


def _worker_store(settings: Settings) -> ObjectStore:
    from moderation.store import open_store

    key = settings.store_url
    if key not in _STORES:
        _STORES[key] = open_store(settings)
    return _STORES[key]


@dataclass
class EmbeddingResult:
    """Vectors of the images that decoded, in ``refs`` order, and the failures.

    ``embedded`` is None unless the embedding was asked not to fetch cached
    vectors (``embed(fetch_cached=False)``): then ``vectors`` holds only the
    images embedded by this call, and ``embedded`` their positions in ``refs``.
    ``retryable`` are the locations of failures that may pass if read again
    (an unexpected error fetching the bytes); every other failure is a
    property of the bytes or of their size, and repeats while they are unchanged.
    """

    refs: list[ImageRef]
    vectors: np.ndarray
    failures: list[Failure] = field(default_factory=list)
    cached: int = 0
    features: dict | None = None  # with a feature cache: counts of local features computed/failed
    embedded: list[int] | None = None
    retryable: list[str] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [r.image_id for r in self.refs]

    @property
    def total(self) -> int:
        return len(self.refs) + len(self.failures)


class _Images(Dataset):
    """Reads, decodes and preprocesses one image; ``pdq_known`` None: no PDQ hashes wanted.

    ``features`` (a :class:`moderation.local_features.FeatureConfig` and the
    shas whose features are stored) asks for the verifier's local features
    of the other images, described from the same bytes: one read per image.
    """

    def __init__(self, source: ImageSource, refs: list[ImageRef], known: frozenset[str],
                 size: int, mode: ResizeMode, max_pixels: int, max_bytes: int,
                 pdq_known: frozenset[str] | None = None, features=None):
        self.source, self.refs, self.known = source, refs, known
        self.size, self.mode, self.max_pixels, self.max_bytes = size, mode, max_pixels, max_bytes
        self.pdq_known = pdq_known
        self.features = features

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        return self.item(i, self.known, self.pdq_known)

    def item(self, i: int, known: frozenset[str], pdq_known: frozenset[str] | None = None):
        """(i, sha, uint8 tensor or None if ``sha`` is in ``known``, PDQ hash or None, failure reason, detail,
        local features or None).

        The PDQ hash is computed from the same decoded image, when hashes are
        wanted and ``sha`` is not in ``pdq_known``; local features likewise
        (``(bytes or None, error)``) when wanted and missing.
        """
        data, reason, detail = read_input(self.source, self.refs[i])
        if reason:
            return i, "", None, None, reason, detail, None
        sha = sha256_hex(data)
        want_pdq = pdq_known is not None and sha not in pdq_known
        feats = self._features(data, sha)
        if sha in known and not want_pdq:
            return i, sha, None, None, "", "", feats
        try:
            img = decode_image(data, self.max_pixels, self.max_bytes, min_size=self.size)
        except Exception as exc:
            return i, sha, None, None, getattr(exc, "reason", "unreadable"), getattr(exc, "detail", str(exc)), None
        tensor = None if sha in known else preprocess_uint8(img, self.size, self.mode)
        return i, sha, tensor, safe_pdq(img) if want_pdq else None, "", "", feats

    def _features(self, data: bytes, sha: str):
        if self.features is None or sha in self.features[1]:
            return None
        from moderation.reference_features import features_of_bytes

        # Decoded again at the verifier's own reduced size (not the descriptor's): the features must equal
        # those a match run computes when one is missing, and a second decode costs far less than a read.
        try:
            return features_of_bytes(data, self.features[0], self.max_pixels, self.max_bytes).to_bytes(), ""
        except BadImageError as exc:
            return None, f"{exc.reason}: {exc.detail}"
        except Exception as exc:  # noqa: BLE001 - recorded per image; the descriptor may still succeed
            return None, f"{type(exc).__name__}: {exc}"


# The reason of a fetch that failed unexpectedly (network, disk): the one failure worth retrying unchanged bytes for.
READ_ERROR = "unreadable"


def read_input(source: ImageSource, ref: ImageRef) -> tuple[bytes, str, str]:
    """(bytes, "", "") or (b"", reason, detail): the first step of every image, in a worker.

    ``reason`` is :data:`READ_ERROR` only for an unexpected error of the
    source; a refusal by the source (BadImageError) keeps its own reason.
    """
    try:
        ref.image_id.encode("utf-8")
    except UnicodeEncodeError:
        # Ids go into CSVs, SQL and object keys; a name that is not UTF-8 cannot.
        return b"", "bad_name", "file name is not valid UTF-8; rename the file"
    try:
        return source.read(ref.location), "", ""
    except BadImageError as exc:  # refused by the source itself (a link, a FIFO, too large)
        return b"", exc.reason, exc.detail
    except Exception as exc:
        return b"", READ_ERROR, f"{type(exc).__name__}: {exc}"


def skipped(ref: ImageRef, reason: str, detail: str) -> Failure:
    """The Failure record of an image that was skipped (names made printable), logged once."""
    failure = Failure(printable(ref.image_id), printable(ref.location), reason, detail)
    log.warning("skipped image %s (%s): %s %s", failure.image_id, failure.location, reason, detail)
    return failure


def printable(name: str) -> str:
    """A name that may hold undecodable bytes (surrogate escapes), made safe to log and store."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def collate_items(items):
    return items


def init_decode_worker(_worker_id: int) -> None:
    # Decoding is single-threaded work; letting each worker also spawn a full
    # intra-op thread pool oversubscribes the cores the model needs.
    torch.set_num_threads(1)


def forward_batch(model: Callable, tensors: list[torch.Tensor], device: torch.device) -> np.ndarray:
    shapes = {t.shape for t in tensors}
    if len(shapes) == 1:
        out = model(normalise_batch(torch.stack(tensors).to(device, non_blocking=True)))
    else:  # short-edge resize: images of different shapes run one by one
        out = torch.cat([model(normalise_batch(t.unsqueeze(0).to(device))) for t in tensors])
    return out.float().cpu().numpy()


def embed(model: Callable, source: ImageSource, settings: Settings, *,
          cache: VectorCache | None = None, device: torch.device | None = None,
          refs: list[ImageRef] | None = None, desc: str = "embedding",
          pdq_cache: VectorCache | None = None, feature_cache=None,
          feature_known: frozenset[str] | None = None, fetch_cached: bool = True) -> EmbeddingResult:
    """Embed every image of ``source`` (or the given ``refs``) with ``model``.

    Returns vectors (float32, unit-norm if the model normalises) for the
    images that decoded, in source order, and a Failure per skipped image.
    Cached vectors are reused and new ones added to ``cache``. Logs each
    failure. Does not enforce the failure-rate limit: see
    :func:`check_failure_rate`. With ``pdq_cache`` (:func:`moderation.pdq.pdq_cache`),
    the PDQ hash of every image it lacks is computed from the same decoded
    image and added to it (an image whose vector is cached is decoded for
    its hash alone). With ``feature_cache`` (:class:`moderation.local_features.FeatureCache`),
    the local features of every image it lacks are described from the same
    bytes and stored; one that cannot be described is logged and counted in
    ``result.features``, and its vector is still returned. ``feature_known``:
    the shas with stored features, if the caller has listed them already.
    With ``fetch_cached`` False (and a ``cache``), a vector the cache holds is
    not fetched: the image is in ``result.refs`` with its sha256 and its
    vector stays in the cache (``result.embedded`` names the rows of
    ``result.vectors``); memory then grows with the images embedded only.
    """
    from tqdm import tqdm

    refs = list(source.refs() if refs is None else refs)
    device = device or torch.device("cpu")
    known = frozenset() if cache is None else cache.known()
    pdq_known = None if pdq_cache is None else pdq_cache.known()
    features = None if feature_cache is None else (
        feature_cache.config, frozenset(feature_cache.known() if feature_known is None else feature_known))
    dataset = _Images(source, refs, known, settings.image_size, settings.resize_mode,
                      settings.max_image_pixels, settings.max_file_bytes, pdq_known, features)
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=settings.workers,
                        collate_fn=collate_items, worker_init_fn=init_decode_worker, pin_memory=device.type == "cuda",
                        persistent_workers=False,
                        prefetch_factor=4 if settings.workers > 0 else None)
    vectors: dict[int, np.ndarray] = {}
    shas: dict[int, str] = {}
    failures: list[Failure] = []
    n_cached = 0
    new_shas: list[str] = []
    new_vecs: list[np.ndarray] = []
    new_pdq: dict[str, PdqHash] = {}
    from_cache: set[int] = set()
    retryable: list[str] = []
    feature_counts = {"computed": 0, "failed": 0}
    if hasattr(model, "eval"):
        model.eval()
    bar = tqdm(total=len(refs), desc=desc, unit="img", file=sys.stderr,
               disable=not settings.progress, dynamic_ncols=True)
    with torch.inference_mode():
        for batch in loader:
            todo = []
            for i, sha, tensor, pdq, reason, detail, feats in batch:
                ref = refs[i]
                if pdq is not None:
                    new_pdq[sha] = pdq
                if feats is not None:
                    _store_features(feature_cache, ref, sha, feats, feature_counts)
                if tensor is None and not reason:
                    if not fetch_cached:  # known from the manifests; a lost part is read again by whoever needs it
                        shas[i] = sha
                        from_cache.add(i)
                        n_cached += 1
                        continue
                    if (vec := cache.get(sha)) is not None:
                        vectors[i], shas[i] = vec, sha
                        n_cached += 1
                        continue
                    # Its cached part was corrupt or has gone: embed the image after all.
                    _, sha, tensor, _, reason, detail, _ = dataset.item(i, frozenset())
                if reason:
                    failures.append(skipped(ref, reason, detail))
                    if not sha and reason == READ_ERROR:
                        retryable.append(ref.location)
                else:
                    todo.append((i, sha, tensor))
            if todo:
                out = forward_batch(model, [t for _, _, t in todo], device)
                for (i, sha, _), vec in zip(todo, out):
                    vectors[i] = vec
                    shas[i] = sha
                    new_shas.append(sha)
                    new_vecs.append(vec)
            bar.update(len(batch))
    bar.close()
    if cache is not None and new_vecs:
        cache.add(new_shas, np.stack(new_vecs))
    if pdq_cache is not None:
        add_hashes(pdq_cache, new_pdq)
    order = sorted(vectors.keys() | from_cache)
    # The fingerprint stays the listing's: if the bytes changed after it, the next run sees a new one.
    out_refs = [replace(refs[i], sha256=shas[i]) for i in order]
    rows = [j for j, i in enumerate(order) if i in vectors]
    dim = next(iter(vectors.values())).shape[0] if vectors else 0
    mat = (np.stack([vectors[order[j]] for j in rows]).astype(np.float32) if rows
           else np.zeros((0, dim), np.float32))
    return EmbeddingResult(out_refs, mat, failures, n_cached,
                           features=None if feature_cache is None else feature_counts,
                           embedded=None if fetch_cached else rows, retryable=retryable)


def _store_features(cache, ref: ImageRef, sha: str, feats: tuple[bytes | None, str], counts: dict) -> None:
    data, error = feats
    if data is None:
        counts["failed"] += 1
        log.warning("no local features for reference %s (%s): %s", ref.image_id, ref.location, error)
        return
    cache.store.put(cache.key(sha), data)
    counts["computed"] += 1


def check_failure_rate(result: EmbeddingResult, limit: float, what: str = "batch") -> None:
    """Raise BatchFailedError if more than ``limit`` of the images failed to decode."""
    total = result.total
    if total == 0:
        raise BatchFailedError(f"the {what} has no images; check the folder or object prefix")
    rate = len(result.failures) / total
    if rate > limit:
        reasons: dict[str, int] = {}
        for f in result.failures:
            reasons[f.reason] = reasons.get(f.reason, 0) + 1
        raise BatchFailedError(
            f"{len(result.failures)} of {total} images in the {what} failed to decode "
            f"({rate:.0%} > limit {limit:.0%}; reasons: {reasons}). Inspect the inputs, or raise "
            "MODERATION_MAX_FAILURE_RATE if this is expected.")


def dedupe_ids(result: EmbeddingResult) -> EmbeddingResult:
    """Keep the first image of each id (two files with one stem would collide in the index)."""
    seen: set[str] = set()
    keep = []
    failures = list(result.failures)
    for j, ref in enumerate(result.refs):
        if ref.image_id in seen:
            failures.append(Failure(ref.image_id, ref.location, "duplicate_id",
                                    "another file has the same id"))
            continue
        seen.add(ref.image_id)
        keep.append(j)
    return EmbeddingResult([result.refs[j] for j in keep], result.vectors[keep], failures, result.cached,
                           result.features)
