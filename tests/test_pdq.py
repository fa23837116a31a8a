"""PDQ hashing, quality and distance; the binary index's radius; the hash-bank file formats.

The tests make their own images (tests/local_images.py) and never read ../shared.
"""

from __future__ import annotations

import re

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


# Hand-made files in the layouts the ThreatExchange project's tools write (facebook/ThreatExchange: the
# python-threatexchange CLI, hasher-matcher-actioner's curation API, the PDQ reference tools in pdq/cpp).
H1 = "f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22"
H2 = "b0a10efd71cc3f429413d48d0ffffe12e34e0e17ada952a9d29684210aa9e5af"
H3 = "adad5a64b5a142e55362a09057dacd5ae63b847fc23794b766b319361fc93188"


def test_threatexchange_cli_signal_lines():
    # `threatexchange hash photo x.jpg >> file.txt` lines, the local_file collaboration's file, a
    # `dataset -P` line (collaboration and opinion after the hash) and a bare hash; another signal type.
    text = (f"pdq {H1}\nvideo_md5 d41d8cd98f00b204e9800998ecf8427e\n"
            f"pdq {H2} 'Sample Signals' FetchedSignalMetadata(opinions=[])\n{H3}\n")
    got = parse_bank(text)  # auto-detected
    assert [(e.entry_id, e.hash.hex()) for e in got] == [(H1, H1), (H2, H2), (H3, H3)]  # no ids: the hash
    with pytest.raises(ModerationError, match="line 2"):
        parse_bank(f"pdq {H1}\npdq {H2[:-1]}\n")
    with pytest.raises(ModerationError, match="line 1"):
        parse_bank(f"PDQ-hash {H1}\n", BankFormat.TX)


def test_pdq_reference_tool_files():
    # pdq-photo-hasher: HASH,QUALITY,FILENAME; with --details: key=value fields; the older README
    # sample and mih-query's input: HASH,metadata.
    text = (f"{H1},100,reg_test/input/dih/bridge-1-original.jpg\n"
            f"hash={H2},norm=128,delta=0,quality=64,filename=bridge-2-rotate-90.jpg\n"
            f"{H3},case 17, second field\n")
    got = parse_bank(text)
    assert [(e.entry_id, e.hash.hex(), e.hash.quality) for e in got] == [
        ("reg_test/input/dih/bridge-1-original.jpg", H1, 100), ("bridge-2-rotate-90.jpg", H2, 64),
        ("case 17, second field", H3, None)]
    with pytest.raises(ModerationError, match="quality 101"):
        parse_bank(f"{H1},101,x.jpg\n")


def test_threatexchange_dataset_csv():
    # `threatexchange dataset -P --csv`: one row per signal and collaboration.
    text = ("signal_type,signal_str,collab,category,tags\n"
            f"pdq,{H1},Sample Signals,POSITIVE_CLASS,media_priority_s1\n"
            f"pdq,{H1},Partner,INVESTIGATION_SEED,\n"
            f"video_md5,d41d8cd98f00b204e9800998ecf8427e,Sample Signals,POSITIVE_CLASS,\n"
            f"pdq,{H2},Partner,NEGATIVE_CLASS,false_positive\n"
            f"pdq,{H3},Partner,DISPUTED,\n")
    got = parse_bank(text)
    assert [e.hash.hex() for e in got] == [H1, H3]  # once each; NEGATIVE_CLASS and video rows are not ours
    # This project's earlier CSV exports still read.
    old = f"signal_type,signal_value,id,quality\npdq,{H1},case-1,90\n"
    assert [(e.entry_id, e.hash.quality) for e in parse_bank(old)] == [("case-1", 90)]
    with pytest.raises(ModerationError, match="no hash column"):
        parse_bank("name,value\nx,y\n")


def test_hma_curation_api_json():
    import json

    # GET /c/bank/NAME/content/ID?include_signals=true answers, and POST /c/bank/NAME/signal bodies.
    rows = [{"id": 12, "disable_until_ts": 1, "original_media_uri": None,
             "bank": {"name": "PARTNER", "matching_enabled_ratio": 1.0},
             "signals": {"pdq": H1, "video_md5": "d41d8cd98f00b204e9800998ecf8427e"}, "note": "from case 4"},
            {"id": 13, "disable_until_ts": 0, "bank": {"name": "PARTNER"}, "signals": {"pdq": H2}},  # disabled
            {"id": 14, "disable_until_ts": 1, "bank": {"name": "PARTNER"}, "signals": {"video_md5": "0" * 32}},
            {"pdq": H3, "note": "case-9"}]
    got = parse_bank("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [(e.entry_id, e.hash.hex()) for e in got] == [("12", H1), ("case-9", H3)]
    assert [e.entry_id for e in parse_bank(json.dumps(rows))] == ["12", "case-9"]  # one JSON array
    with pytest.raises(ModerationError, match="line 2"):
        parse_bank(json.dumps(rows[0]) + "\n{not json\n")


# What their readers do with a line, from their source: threatexchange/exchanges/impl/file_api.py
# (local_file), cli/match_cmd.py (--hashes) with PdqSignal.validate_signal_str, pdq/cpp/io/hashio.cpp,
# and HMA's POST /c/bank/NAME/signal (blueprints/curation.py: `note` at most 255 characters, every
# other key a signal type name whose value PdqSignal validates).
_TE_PDQ = re.compile(r"^[0-9a-f]{64}$")


def _local_file_reader(text):
    out = []
    for line in text.splitlines(keepends=True):
        signal_type, _, signal = line.strip().partition(" ")
        if signal_type and signal:
            assert signal_type == "pdq" and _TE_PDQ.match(signal)
            out.append(signal)
    return out


def _match_hashes_reader(text):
    out = [ln.strip() for ln in text.splitlines() if ln.strip()]
    assert all(_TE_PDQ.match(h) for h in out)
    return out


def _pdq_tools_reader(text):
    out = []
    for line in text.splitlines():
        head, _, meta = line.partition(",")
        head = head[len("hash="):] if head.startswith("hash=") else head
        assert len(head) == 64 and int(head, 16) >= 0
        out.append((head, meta))
    return out


def _hma_signal_post(text):
    import json

    out = []
    for line in text.splitlines():
        body = json.loads(line)
        note = body.pop("note", None)
        assert note is None or isinstance(note, str) and len(note) <= 255
        assert set(body) == {"pdq"} and _TE_PDQ.match(body["pdq"])
        out.append((body["pdq"], note))
    return out


def _entries():
    return [BankEntry("case-1", _hash(1)), BankEntry("case 2", PdqHash(_hash(2).bits, None)),
            BankEntry(_hash(3).hex(), PdqHash(_hash(3).bits, 77))]


@pytest.mark.parametrize("fmt", [BankFormat.TX, BankFormat.HASHES, BankFormat.PDQ, BankFormat.CSV, BankFormat.HMA])
def test_exports_read_by_their_tools_and_back_by_ours(fmt):
    entries = _entries()
    hexes = [e.hash.hex() for e in entries]
    text = format_bank(entries, fmt, bank="partner")
    back = parse_bank(text)  # auto-detected
    assert [e.hash.bits for e in back] == [e.hash.bits for e in entries]
    if fmt == BankFormat.TX:
        assert _local_file_reader(text) == hexes
    elif fmt == BankFormat.HASHES:
        assert _match_hashes_reader(text) == hexes
    elif fmt == BankFormat.PDQ:
        assert _pdq_tools_reader(text) == [(h, m) for h, m in zip(hexes, ["90,case-1", "case 2", f"77,{hexes[2]}"])]
    elif fmt == BankFormat.HMA:
        assert _hma_signal_post(text) == [(h, e.entry_id) for h, e in zip(hexes, entries)]
    else:
        assert text.splitlines()[0] == "signal_type,signal_str,collab,category,tags,id,quality"
        assert text.splitlines()[1].startswith(f"pdq,{hexes[0]},partner,POSITIVE_CLASS,")
    if fmt in (BankFormat.TX, BankFormat.HASHES):
        assert [e.entry_id for e in back] == hexes  # no ids in these layouts: the hash is the id
    else:
        assert [e.entry_id for e in back] == [e.entry_id for e in entries]
    if fmt in (BankFormat.PDQ, BankFormat.CSV):
        assert [e.hash.quality for e in back] == [90, None, 77]


def test_repeated_ids_and_comments():
    h = _hash(6).hex()
    assert [(e.entry_id, e.hash.hex()) for e in parse_bank(f"# c\n{h},abc\n\n{h},def\n")] == [("abc", h), ("def", h)]
    with pytest.raises(ModerationError, match="line 2"):
        parse_bank(f"{h},a\n{h[:-2]},b\n")
    with pytest.raises(ModerationError, match="twice"):
        parse_bank(f"{h},a\n{_hash(7).hex()},a\n")


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


def test_codes_from_rows_reads_many_cached_rows_as_from_row_reads_one():
    from moderation.pdq import codes_from_rows

    hashes = [PdqHash(bytes(range(i, i + 32)), q) for i, q in ((0, 100), (7, None), (200 - 32, 0))]
    rows = np.stack([h.to_row() for h in hashes])
    codes, quality = codes_from_rows(rows)
    assert codes.dtype == np.uint8 and quality.dtype == np.int16
    back = [PdqHash.from_row(r) for r in rows]
    assert [bytes(c) for c in codes] == [h.bits for h in back] == [h.bits for h in hashes]
    assert list(quality) == [-1 if h.quality is None else h.quality for h in back] == [100, -1, 0]
    with pytest.raises(ValueError):
        codes_from_rows(np.zeros((2, 512), np.float32))  # a descriptor part, not PDQ rows
