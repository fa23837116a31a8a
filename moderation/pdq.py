"""PDQ, Meta's 256-bit perceptual hash, beside the SSCD descriptor: hashing, distance, cache, search.

PDQ matches near-exact copies (re-encodes, resizes, light colour edits)
that moderation teams exchange as hash lists (ThreatExchange, HMA). A pair
is a PDQ match when the Hamming distance of the two hashes is at most
``max_distance`` (Meta's recommended 31 of 256 bits) and both hashes have a
quality of at least ``min_quality`` (Meta's 50: flat, featureless images
give unstable hashes). A hash whose quality is unknown (one imported from a
bank without it) is accepted: its sender already filtered it.

Bit order: bit ``i`` of the hash is the ``i``-th value ``pdqhash.compute``
returns; the 64-character hex form reads those bits as one big-endian
binary number, which is ThreatExchange's PDQ signal string. ``bits`` holds
them packed the same way (``numpy.packbits``), so ``bits.hex()`` is that
string.

Hashes are cached by image sha256 in the vector cache
(:class:`moderation.vector_cache.VectorCache`) under the pseudo model
version :data:`CACHE_MODEL`, as 33 float32 values per image (32 hash bytes
and the quality): references stay, query hashes expire with query vectors.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from moderation.store import ObjectStore
from moderation.vector_cache import Namespace, VectorCache

log = logging.getLogger(__name__)

BITS = 256
BYTES = BITS // 8
HEX_LEN = BITS // 4
CACHE_MODEL = "pdq-256"  # the vector cache's "model" folder for PDQ hashes
DEFAULT_MAX_DISTANCE = 31
DEFAULT_MIN_QUALITY = 50
_HEX = frozenset("0123456789abcdef")
MIH_TABLES = 16  # substrings of 16 bits: radius 31 needs one flip per substring
FLAT_BELOW = 200_000  # set from benchmarks/pdq_bench.py


@dataclass(frozen=True)
class PdqHash:
    """A 256-bit PDQ hash (``bits``: 32 bytes, big-endian bit order) and its quality (0-100; None: unknown)."""

    bits: bytes
    quality: int | None = None

    def __post_init__(self):
        if len(self.bits) != BYTES:
            raise ValueError(f"a PDQ hash has {BYTES} bytes, not {len(self.bits)}")

    def hex(self) -> str:
        """The 64 lowercase hex characters of ThreatExchange's PDQ signal."""
        return self.bits.hex()

    @classmethod
    def from_hex(cls, text: str, quality: int | None = None) -> PdqHash:
        """Parse a 64-character hex PDQ hash (either case, surrounding blanks ignored); ValueError otherwise."""
        value = text.strip().lower()
        if len(value) != HEX_LEN or not set(value) <= _HEX:
            raise ValueError(f"not a PDQ hash (64 hex characters): {text[:80]!r}")
        return cls(bytes.fromhex(value), quality)

    def distance(self, other: PdqHash) -> int:
        """Hamming distance in bits (0..256)."""
        return (int.from_bytes(self.bits, "big") ^ int.from_bytes(other.bits, "big")).bit_count()

    def usable(self, min_quality: int) -> bool:
        return self.quality is None or self.quality >= min_quality

    def to_row(self) -> np.ndarray:
        """33 float32 values (hash bytes, then quality or -1): the vector-cache form."""
        return np.array([*self.bits, -1 if self.quality is None else self.quality], np.float32)

    @classmethod
    def from_row(cls, row: np.ndarray) -> PdqHash:
        values = np.asarray(row).reshape(-1)
        if values.shape[0] != BYTES + 1:
            raise ValueError("not a cached PDQ row")
        quality = int(values[BYTES])
        return cls(bytes(int(v) for v in values[:BYTES]), None if quality < 0 else quality)


def codes_from_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, qualities) of many cached rows at once (:meth:`PdqHash.to_row`'s form), no object per hash.

    Codes are uint8 (n, 32); qualities int16 with -1 for unknown, as
    :class:`PdqIndex` holds them. ValueError for rows of another width.
    """
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != BYTES + 1:
        raise ValueError("not cached PDQ rows")
    return rows[:, :BYTES].astype(np.uint8), np.maximum(rows[:, BYTES], -1).astype(np.int16)


def compute_pdq(image) -> PdqHash:
    """The PDQ hash of an RGB image (PIL image or HxWx3 uint8 array); never raises on image content."""
    import pdqhash

    rgb = np.asarray(image, dtype=np.uint8)
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=-1)
    bits, quality = pdqhash.compute(np.ascontiguousarray(rgb[..., :3]))
    return PdqHash(np.packbits(np.asarray(bits, np.uint8)).tobytes(), int(quality))


def pdq_of_bytes(data: bytes, max_pixels: int = 64_000_000, max_bytes: int = 50_000_000) -> PdqHash:
    """Decode image bytes (BadImageError if they are not an image) and hash them."""
    from moderation.images import decode_image

    # PDQ works on a 64x64 reduction: a JPEG decoded at a reduced DCT scale loses nothing it uses.
    return compute_pdq(decode_image(data, max_pixels, max_bytes, min_size=512))


def safe_pdq(image) -> PdqHash | None:
    """:func:`compute_pdq`, or None (logged) if the hasher fails: a missing hash only loses that signal."""
    try:
        return compute_pdq(image)
    except Exception as exc:  # the native hasher: one odd image must not fail a batch
        log.warning("no PDQ hash: %s: %s", type(exc).__name__, exc)
        return None


@dataclass(frozen=True)
class PdqConfig:
    """Whether PDQ runs, and what counts as a PDQ match."""

    enabled: bool = True
    max_distance: int = DEFAULT_MAX_DISTANCE
    min_quality: int = DEFAULT_MIN_QUALITY

    @classmethod
    def from_settings(cls, s) -> PdqConfig:
        return cls(bool(s.pdq), int(s.pdq_max_distance), int(s.pdq_min_quality))

    def as_dict(self) -> dict:
        return {"enabled": self.enabled, "max_distance": self.max_distance, "min_quality": self.min_quality}


def pdq_cache(store: ObjectStore | None, namespace: Namespace) -> VectorCache:
    """The PDQ hash cache of ``namespace`` (the vector cache's layout and integrity checks)."""
    return VectorCache(store, CACHE_MODEL, namespace, warn_legacy=False)


def cached_hash(cache: VectorCache, sha: str) -> PdqHash | None:
    row = cache.get(sha)
    if row is None:
        return None
    try:
        return PdqHash.from_row(row)
    except ValueError:
        return None


def add_hashes(cache: VectorCache, hashes: dict[str, PdqHash]) -> None:
    """Persist new hashes (sha -> hash) as one cache part."""
    if hashes:
        cache.add(list(hashes), np.stack([h.to_row() for h in hashes.values()]))


@dataclass(frozen=True)
class PdqMatch:
    query_id: str
    reference_id: str
    distance: int


class PdqIndex:
    """Reference PDQ hashes by id, searched by Hamming radius (FAISS binary index).

    Below ``flat_below`` hashes: exhaustive ``IndexBinaryFlat``. From there:
    ``IndexBinaryMultiHash`` (multi-index hashing, Norouzi et al.): the hash
    is cut into :data:`MIH_TABLES` substrings, each a hash-table key; two
    hashes within ``r`` bits agree within ``r // MIH_TABLES`` bits on at
    least one substring (pigeonhole), so probing every key within that many
    flips and checking the full distance of what is found is exact, not
    approximate. Timings for both: benchmarks/pdq_bench.py.
    """

    def __init__(self, ids: Sequence[str], codes: np.ndarray, quality: np.ndarray):
        self.ids = list(ids)
        self.codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1, BYTES)
        self.quality = np.asarray(quality, np.int16).reshape(-1)
        if not len(self.ids) == self.codes.shape[0] == self.quality.shape[0]:
            raise ValueError("ids, codes and qualities disagree in length")
        self._index = None

    @classmethod
    def from_hashes(cls, items: Iterable[tuple[str, PdqHash]]) -> PdqIndex:
        pairs = list(items)
        codes = np.frombuffer(b"".join(h.bits for _, h in pairs), np.uint8).reshape(-1, BYTES)
        quality = np.array([-1 if h.quality is None else h.quality for _, h in pairs], np.int16)
        return cls([i for i, _ in pairs], codes, quality)

    def __len__(self) -> int:
        return len(self.ids)

    def concat(self, other: PdqIndex) -> PdqIndex:
        return PdqIndex(self.ids + other.ids, np.concatenate([self.codes, other.codes]),
                        np.concatenate([self.quality, other.quality]))

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, ids=np.array(self.ids, dtype=str), codes=self.codes, quality=self.quality)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PdqIndex:
        """ValueError on bytes that are not a PDQ index file (never unpickles)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return cls([str(i) for i in z["ids"]], z["codes"], z["quality"])
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"not a PDQ index file: {exc}") from None

    def faiss_index(self, flat_below: int = FLAT_BELOW):
        if self._index is None:
            import faiss

            if len(self) < flat_below:
                index = faiss.IndexBinaryFlat(BITS)
            else:
                index = faiss.IndexBinaryMultiHash(BITS, MIH_TABLES, BITS // MIH_TABLES)
            if len(self):
                index.add(self.codes)
            self._index = index
        return self._index

    def search(self, queries: Sequence[tuple[str, PdqHash]], max_distance: int = DEFAULT_MAX_DISTANCE,
               min_quality: int = DEFAULT_MIN_QUALITY) -> list[PdqMatch]:
        """Every (query, reference) within ``max_distance`` bits, both of quality >= ``min_quality``.

        Matches come per query in the order of ``queries``, nearest first
        (ties by reference id). Low-quality queries are not searched.
        """
        usable = [(qid, h) for qid, h in queries if h is not None and h.usable(min_quality)]
        if not usable or not len(self):
            return []
        x = np.frombuffer(b"".join(h.bits for _, h in usable), np.uint8).reshape(-1, BYTES)
        index = self.faiss_index()
        if hasattr(index, "nflip"):
            index.nflip = max_distance // MIH_TABLES
        # FAISS keeps results strictly below the radius.
        lims, dist, idx = index.range_search(x, max_distance + 1)
        out: list[PdqMatch] = []
        for q, (qid, _) in enumerate(usable):
            hits = []
            for d, j in zip(dist[lims[q]:lims[q + 1]], idx[lims[q]:lims[q + 1]]):
                ref_quality = int(self.quality[j])
                if ref_quality < 0 or ref_quality >= min_quality:
                    hits.append(PdqMatch(qid, self.ids[j], int(d)))
            out += sorted(hits, key=lambda m: (m.distance, m.reference_id))
        return out
