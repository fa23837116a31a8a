"""PDQ hashing, quality and distance; the binary index's radius; the hash-bank file formats.

The tests make their own images (tests/local_images.py) and never read ../shared.
"""

from __future__ import annotations

import numpy as np
import pytest

from local_images import as_jpeg, flat, textured
from moderation.errors import IntegrityError, ModerationError
from moderation.hash_banks import (BankEntry, BankFormat, current_version, format_bank, import_bank, list_banks,
                                   load_bank, parse_bank)
from moderation.pdq import PdqHash, PdqIndex, compute_pdq, pdq_cache, pdq_of_bytes
from moderation.vector_cache import Namespace


def _hash(seed: int, bit_flips: int = 0) -> PdqHash:
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, 256).astype(np.uint8)
    return PdqHash(np.packbits(bits).tobytes(), 90)


def _flip(h: PdqHash, n: int, quality: int | None = 90) -> PdqHash:
    bits = np.unpackbits(np.frombuffer(h.bits, np.uint8))
    bits[:n] ^= 1
    return PdqHash(np.packbits(bits).tobytes(), quality)


def test_a_jpeg_re_encode_is_within_31_bits_and_an_unrelated_image_is_not():
    img = textured(11)
    h = compute_pdq(img)
    near = compute_pdq(as_jpeg(img.resize((300, 225)), 60))
    other = compute_pdq(textured(12))
    assert h.quality >= 50 and near.quality >= 50
    assert h.distance(near) <= 31
    assert h.distance(other) > 31
    assert h.distance(h) == 0


def test_a_flat_image_has_low_quality():
    assert compute_pdq(flat()).quality < 50


def test_hex_is_threatexchanges_big_endian_bit_string():
    import pdqhash

    img = textured(13)
    bits, _ = pdqhash.compute(np.asarray(img))
    expected = "%064x" % int("".join(str(int(b)) for b in bits), 2)
    h = compute_pdq(img)
    assert h.hex() == expected and len(expected) == 64
    assert PdqHash.from_hex(expected.upper()).bits == h.bits
    with pytest.raises(ValueError):
        PdqHash.from_hex(expected[:-1])
    with pytest.raises(ValueError):
        PdqHash.from_hex("g" * 64)


def test_distance_is_hamming():
    a = _hash(1)
    assert a.distance(_flip(a, 31)) == 31
    assert a.distance(_flip(a, 256)) == 256


def test_hash_of_bytes_matches_the_decoded_image():
    import io

    img = textured(14)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert pdq_of_bytes(buf.getvalue()).bits == compute_pdq(img).bits


def test_index_range_is_inclusive_at_31_and_filters_low_quality():
    base = [_hash(s) for s in range(50)]
    index = PdqIndex.from_hashes([(f"r{i}", h) for i, h in enumerate(base)]
                                 + [("low", _flip(base[7], 2, quality=20)), ("unknown", _flip(base[8], 3, None))])
    queries = [("q31", _flip(base[3], 31)), ("q32", _flip(base[4], 32)), ("q7", base[7]), ("q8", base[8]),
               ("qlow", _flip(base[5], 0, quality=10))]
    got = {(m.query_id, m.reference_id): m.distance for m in index.search(queries, 31, 50)}
    assert got[("q31", "r3")] == 31
    assert not any(q == "q32" for q, _ in got)  # 32 bits: not a match
    assert ("q7", "low") not in got and got[("q7", "r7")] == 0  # a low-quality reference never matches
    assert got[("q8", "unknown")] == 3  # unknown quality (an imported hash) is accepted
    assert not any(q == "qlow" for q, _ in got)
    again = PdqIndex.from_bytes(index.to_bytes())
    assert again.ids == index.ids and (again.codes == index.codes).all()


def test_multi_hash_index_finds_the_same_matches_as_the_flat_one():
    base = [_hash(s) for s in range(300)]
    index = PdqIndex.from_hashes([(f"r{i}", h) for i, h in enumerate(base)])
    queries = [(f"q{i}", _flip(base[i], i % 40)) for i in range(0, 300, 3)]
    flat_hits = index.search(queries, 31, 50)
    index._index = None
    index.faiss_index(flat_below=0)
    assert index.search(queries, 31, 50) == flat_hits
    assert len(flat_hits) == sum(1 for i in range(0, 300, 3) if i % 40 <= 31)


def test_cache_round_trip(tmp_path):
    from moderation.store import LocalStore

    store = LocalStore(tmp_path / "store")
    cache = pdq_cache(store, Namespace.REFERENCES)
    h = compute_pdq(textured(15))
    from moderation.pdq import add_hashes, cached_hash

    add_hashes(cache, {"a" * 64: h, "b" * 64: PdqHash(h.bits, None)})
    again = pdq_cache(store, Namespace.REFERENCES)
    assert cached_hash(again, "a" * 64) == h
    assert cached_hash(again, "b" * 64).quality is None
    assert cached_hash(again, "c" * 64) is None


# -- bank formats --------------------------------------------------------------------------------------


def _entries():
    return [BankEntry("case-1", _hash(1)), BankEntry("case 2", PdqHash(_hash(2).bits, None)),
            BankEntry(_hash(3).hex(), PdqHash(_hash(3).bits, 77))]


@pytest.mark.parametrize("fmt", [BankFormat.CSV, BankFormat.HASHID, BankFormat.TE])
def test_formats_round_trip(fmt):
    entries = _entries()
    text = format_bank(entries, fmt)
    back = parse_bank(text)  # auto-detected
    assert [e.hash.bits for e in back] == [e.hash.bits for e in entries]
    if fmt == BankFormat.TE:
        assert text.splitlines() == [e.hash.hex() for e in entries]
        assert [e.entry_id for e in back] == [e.hash.hex() for e in entries]  # no ids: the hash is the id
    else:
        assert [e.entry_id for e in back] == [e.entry_id for e in entries]
    if fmt == BankFormat.CSV:
        assert [e.hash.quality for e in back] == [90, None, 77]
        assert text.splitlines()[0] == "signal_type,signal_value,id,quality"


def test_csv_with_other_columns_and_signal_types():
    h1, h2 = _hash(4).hex(), _hash(5).hex()
    text = (f"# exported\nSignal_Type,Signal,Bank_Content_Id,tags\npdq,{h1},c1,x\n"
            f"video_md5,d41d8cd98f00b204e9800998ecf8427e,c2,y\n\npdq,{h2.upper()},c3,z\n")
    got = parse_bank(text)
    assert [(e.entry_id, e.hash.hex()) for e in got] == [("c1", h1), ("c3", h2)]


def test_hashid_accepts_tabs_and_comments_and_rejects_bad_lines():
    h = _hash(6).hex()
    assert [(e.entry_id, e.hash.hex()) for e in parse_bank(f"# c\n{h}\tabc\n\n{h} def\n")] == [("abc", h), ("def", h)]
    with pytest.raises(ModerationError, match="line 2"):
        parse_bank(f"{h},a\n{h[:-2]},b\n")
    with pytest.raises(ModerationError, match="twice"):
        parse_bank(f"{h},a\n{_hash(7).hex()},a\n")
    with pytest.raises(ModerationError, match="no hash column"):
        parse_bank("name,value\nx,y\n")


def test_banks_are_versioned_and_checked(tmp_path):
    from moderation.store import LocalStore

    store = LocalStore(tmp_path / "store")
    first = import_bank(store, "partner", _entries()[:2], source="a.csv")
    assert import_bank(store, "partner", _entries()[:2]).version == first.version  # unchanged: no new version
    second = import_bank(store, "partner", _entries())
    assert second.version != first.version and store.exists(first.key)
    record, entries = load_bank(store, "partner")
    assert record == current_version(store, "partner") and len(entries) == 3
    assert list_banks(store) == ["partner"]
    with pytest.raises(ModerationError):
        import_bank(store, "references", _entries())
    with pytest.raises(ModerationError):
        import_bank(store, "../x", _entries())
    store.put(second.key, b"signal_type,signal_value,id,quality\n")
    with pytest.raises(IntegrityError):
        load_bank(store, "partner")
