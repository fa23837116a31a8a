"""Everything the two-stage matcher needs from a query batch, from one decode per image.

DataLoader workers read and decode each query once, cut its views
(:mod:`moderation.views`) and extract its local features, plain and
mirrored (:mod:`moderation.local_features`); the main process runs the
descriptor over all views in batches. The whole-image view is preprocessed
exactly as :func:`moderation.embedding.embed` does, and its vector goes to
the same vector cache.

Failure policy: as in :mod:`moderation.embedding`: an image that cannot be
read or decoded becomes a :class:`~moderation.images.Failure` with its
reason and the batch goes on; an image with no keypoints gets empty
features (and so no verification), never an error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moderation.config import ResizeMode, Settings
from moderation.embedding import (ImageSource, VectorCache, collate_items, forward_batch, init_decode_worker,
                                  read_input, skipped)
from moderation.images import Failure, ImageRef, decode_image, preprocess_uint8, sha256_hex
from moderation.local_features import FeatureConfig, LocalFeatures, extract
from moderation.pdq import PdqHash, add_hashes, safe_pdq
from moderation.views import ViewConfig, plan_views, render



@dataclass
class QueryAnalysis:
    """Per decoded query (in ``refs`` order): its views' vectors and its local features.

    ``vectors`` stacks every view of every query; ``owner[j]`` is the index
    in ``refs`` of the query that view ``j`` belongs to and ``view_names[j]``
    its name. ``full`` holds each query's whole-image vector (``refs`` order).
    ``features``/``mirrored`` are None when features were not asked for.
    """

    refs: list[ImageRef]
    vectors: np.ndarray
    owner: np.ndarray
    view_names: list[str]
    full: np.ndarray
    features: list[LocalFeatures | None] = field(default_factory=list)
    mirrored: list[LocalFeatures | None] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    pdq: list[PdqHash | None] = field(default_factory=list)  # per query when asked for, else empty

    @property
    def ids(self) -> list[str]:
        return [r.image_id for r in self.refs]

    def views_per_query(self) -> float:
        return len(self.view_names) / max(1, len(self.refs))


class _Queries(Dataset):
    def __init__(self, source: ImageSource, refs: list[ImageRef], size: int, mode: ResizeMode,
                 views: ViewConfig, features: FeatureConfig | None, max_pixels: int, max_bytes: int,
                 pdq: bool = False):
        self.source, self.refs, self.size, self.mode = source, refs, size, mode
        self.views, self.features, self.pdq = views, features, pdq
        self.max_pixels, self.max_bytes = max_pixels, max_bytes

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        data, reason, detail = read_input(self.source, self.refs[i])
        if reason:
            return i, "", None, reason, detail
        sha = sha256_hex(data)
        # Crops need more pixels than the whole image: decode at least twice the model's size.
        min_side = max(2 * self.size, self.features.max_side if self.features else 0)
        try:
            img = decode_image(data, self.max_pixels, self.max_bytes, min_size=min_side)
        except Exception as exc:
            return i, sha, None, getattr(exc, "reason", "unreadable"), getattr(exc, "detail", str(exc))
        plan = plan_views(img, self.views)
        tensors = torch.stack([preprocess_uint8(render(img, v), self.size, self.mode) for v in plan]) \
            if self.mode == ResizeMode.SQUARE else [preprocess_uint8(render(img, v), self.size, self.mode)
                                                    for v in plan]
        feats = mirrored = None
        if self.features is not None:
            feats = extract(img, self.features)
            mirrored = extract(img, self.features, mirror=True)
        pdq = safe_pdq(img) if self.pdq else None
        return i, sha, ([v.name for v in plan], tensors, feats, mirrored, pdq), "", ""


def analyse_queries(model: Callable, source: ImageSource, settings: Settings, views: ViewConfig,
                    features: FeatureConfig | None, *, cache: VectorCache | None = None,
                    device: torch.device | None = None, refs: list[ImageRef] | None = None,
                    desc: str = "analysing queries", pdq_cache: VectorCache | None = None) -> QueryAnalysis:
    """Decode each query once; embed all its views; extract its local features (unless None).

    With ``pdq_cache`` (:func:`moderation.pdq.pdq_cache`), each query's PDQ
    hash is computed from the same decoded image (``QueryAnalysis.pdq``) and
    hashes new to the cache are added to it.

    ``settings`` carry the model's own preprocessing (``LoadedModel.settings_for``).
    Whole-image vectors new to ``cache`` are added to it. ``refs`` limits the
    work to those images of ``source``. Never raises on a bad image; see the
    module's failure policy.
    """
    from tqdm import tqdm

    refs = list(source.refs() if refs is None else refs)
    device = device or torch.device("cpu")
    dataset = _Queries(source, refs, settings.image_size, settings.resize_mode, views, features,
                       settings.max_image_pixels, settings.max_file_bytes, pdq=pdq_cache is not None)
    per_batch = max(1, settings.batch_size // 4) if not views.only_full else settings.batch_size
    loader = DataLoader(dataset, batch_size=per_batch, num_workers=settings.workers, collate_fn=collate_items,
                        worker_init_fn=init_decode_worker, persistent_workers=False,
                        prefetch_factor=2 if settings.workers > 0 else None)
    kept: list[tuple[int, str, list[str], np.ndarray, LocalFeatures | None, LocalFeatures | None,
                     PdqHash | None]] = []
    new_pdq: dict[str, PdqHash] = {}
    failures: list[Failure] = []
    new_shas, new_full = [], []
    bar = tqdm(total=len(refs), desc=desc, unit="img", file=sys.stderr, disable=not settings.progress,
               dynamic_ncols=True)
    if hasattr(model, "eval"):
        model.eval()
    with torch.inference_mode():
        for batch in loader:
            todo = []
            for i, sha, payload, reason, detail in batch:
                if reason:
                    failures.append(skipped(refs[i], reason, detail))
                else:
                    todo.append((i, sha, payload))
            if not todo:
                bar.update(len(batch))
                continue
            tensors = [t for _, _, (_, ts, _, _, _) in todo for t in ts]
            out = np.concatenate([forward_batch(model, tensors[s:s + settings.batch_size], device)
                                  for s in range(0, len(tensors), settings.batch_size)])
            pos = 0
            for i, sha, (names, ts, feats, mirrored, pdq) in todo:
                vecs = out[pos:pos + len(names)]
                pos += len(names)
                kept.append((i, sha, names, vecs, feats, mirrored, pdq))
                if pdq is not None and pdq_cache is not None and sha not in pdq_cache:
                    new_pdq[sha] = pdq
                if cache is not None and sha not in cache:
                    new_shas.append(sha)
                    new_full.append(vecs[0])
            bar.update(len(batch))
    bar.close()
    if cache is not None and new_full:
        cache.add(new_shas, np.stack(new_full))
    if pdq_cache is not None:
        add_hashes(pdq_cache, new_pdq)
    kept.sort(key=lambda t: t[0])
    out_refs = [ImageRef(refs[i].image_id, refs[i].location, sha) for i, sha, *_ in kept]
    dim = kept[0][3].shape[1] if kept else 0
    vectors = np.concatenate([k[3] for k in kept]).astype(np.float32) if kept else np.zeros((0, dim), np.float32)
    owner = np.concatenate([np.full(len(k[2]), q, np.int64) for q, k in enumerate(kept)]) if kept \
        else np.zeros(0, np.int64)
    names = [n for k in kept for n in k[2]]
    full = np.stack([k[3][0] for k in kept]).astype(np.float32) if kept else np.zeros((0, dim), np.float32)
    return QueryAnalysis(out_refs, vectors, owner, names, full, [k[4] for k in kept], [k[5] for k in kept],
                         failures, [k[6] for k in kept] if pdq_cache is not None else [])
