"""PDQ hash banks: hash lists received from other teams (no images), stored, versioned and matched.

File formats (read by :func:`parse_bank`, written by :func:`format_bank`):

- ``te``: ThreatExchange's PDQ signal, one 64-hex-character hash per line.
- ``hashid``: HMA-style ``hash,id`` text, one entry per line, no header
  (the id may be missing; tab or blank separation is accepted too).
- ``csv``: a CSV file with a header row naming a hash column (``signal_value``,
  ``signal``, ``hash`` or ``pdq``) and optionally an id column (``id``,
  ``signal_id``, ``content_id``, ``bank_content_id``), a ``quality`` column and
  a ``signal_type`` column (rows of another signal type are skipped): the
  bank exports HMA and python-threatexchange users pass around.

``auto`` (the default for reading) picks ``csv`` when the first line is a
header, ``hashid`` otherwise. Blank lines and lines starting with ``#`` are
ignored. An entry without an id gets its hash as id. Any malformed line
makes the whole import fail with its line number (a bank is imported
completely or not at all).

Storage: a bank version is one canonical CSV object
``hashbanks/NAME/versions/VERSION.csv``; ``hashbanks/NAME/CURRENT.json``,
written after it, names the version in force with its sha256 and entry
count. Replacing a bank is publishing a new version and moving the
pointer (one atomic PUT): a matching run reads either the old bank or the
new one, never a mix; a version whose bytes do not match the pointer's
sha256 is refused (IntegrityError).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import Enum

from moderation.errors import IntegrityError, ModerationError, NotFoundError
from moderation.images import sha256_hex
from moderation.pdq import HEX_LEN, PdqHash, PdqIndex
from moderation.store import ObjectStore

ROOT = "hashbanks/"
REFERENCES = "references"  # reserved: export only, the current index's own references
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_ID_CHARS = 200
_HASH_COLUMNS = ("signal_value", "signal", "hash", "pdq", "pdq_hash")
_ID_COLUMNS = ("id", "signal_id", "content_id", "bank_content_id")
# Reference ids of bank entries in flagged pairs: never an image reference's id (a file stem has no ':').
ID_PREFIX = "hashbank:"


class BankFormat(str, Enum):
    AUTO = "auto"
    TE = "te"
    HASHID = "hashid"
    CSV = "csv"


@dataclass(frozen=True)
class BankEntry:
    """One hash of a bank and the id its sender gave it."""

    entry_id: str
    hash: PdqHash


@dataclass(frozen=True)
class BankVersion:
    """The CURRENT pointer of a bank."""

    bank: str
    version: str
    key: str
    sha256: str
    count: int
    created_at: str
    source: str = ""


def check_name(name: str, *, importing: bool = False) -> str:
    """The bank name if valid (1-64 of letters, digits, ``_.-``); ModerationError otherwise."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ModerationError(f"bank name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
    if importing and name == REFERENCES:
        raise ModerationError(f"bank name {REFERENCES!r} is reserved for exporting the indexed references")
    return name


def reference_id(bank: str, entry_id: str) -> str:
    """The reference id a flagged pair against a bank entry carries."""
    return f"{ID_PREFIX}{bank}:{entry_id}"


# -- formats -----------------------------------------------------------------------------------


def parse_bank(text: str, fmt: BankFormat = BankFormat.AUTO) -> list[BankEntry]:
    """The entries of a bank file; ModerationError naming the first bad line.

    Entries keep file order; a repeated id keeps its first hash (and is
    reported as an error if the hashes differ).
    """
    fmt = BankFormat(fmt)
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    if fmt == BankFormat.AUTO:
        fmt = BankFormat.CSV if first and not _looks_like_hash(_split(first)[0]) else BankFormat.HASHID
    entries = _parse_csv(text) if fmt == BankFormat.CSV else _parse_lines(lines, fmt)
    seen: dict[str, PdqHash] = {}
    out = []
    for lineno, entry in entries:
        if entry.entry_id in seen:
            if seen[entry.entry_id].bits != entry.hash.bits:
                raise ModerationError(f"line {lineno}: id {entry.entry_id!r} appears twice with different hashes")
            continue
        seen[entry.entry_id] = entry.hash
        out.append(entry)
    return out


def _looks_like_hash(token: str) -> bool:
    try:
        PdqHash.from_hex(token)
        return True
    except ValueError:
        return False


def _split(line: str) -> list[str]:
    return [t.strip() for t in re.split(r"[,\t ]+", line.strip(), maxsplit=1)]


def _entry(lineno: int, hex_text: str, entry_id: str | None, quality: str | None = None) -> tuple[int, BankEntry]:
    try:
        h = PdqHash.from_hex(hex_text, int(quality) if quality not in (None, "") else None)
    except ValueError as exc:
        raise ModerationError(f"line {lineno}: {exc}") from None
    if h.quality is not None and not 0 <= h.quality <= 100:
        raise ModerationError(f"line {lineno}: quality {h.quality} is not 0-100")
    entry_id = (entry_id or "").strip() or h.hex()
    if len(entry_id) > MAX_ID_CHARS or any(ord(c) < 32 for c in entry_id):
        raise ModerationError(f"line {lineno}: the id must be at most {MAX_ID_CHARS} printable characters")
    return lineno, BankEntry(entry_id, h)


def _parse_lines(lines: list[str], fmt: BankFormat) -> list[tuple[int, BankEntry]]:
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = _split(line) if fmt == BankFormat.HASHID else [line.strip()]
        out.append(_entry(lineno, parts[0], parts[1] if len(parts) > 1 else None))
    return out


def _parse_csv(text: str) -> list[tuple[int, BankEntry]]:
    rows = [r for r in csv.reader(io.StringIO(text))]
    header_at = next((i for i, r in enumerate(rows) if r and any(c.strip() for c in r)
                      and not r[0].lstrip().startswith("#")), None)
    if header_at is None:
        return []
    header = [c.strip().lower() for c in rows[header_at]]
    col = {name: header.index(name) for name in header if name}
    hash_col = next((col[c] for c in _HASH_COLUMNS if c in col), None)
    if hash_col is None:
        raise ModerationError(f"CSV header {rows[header_at]!r} has no hash column (one of {', '.join(_HASH_COLUMNS)})")
    id_col = next((col[c] for c in _ID_COLUMNS if c in col), None)
    q_col, type_col = col.get("quality"), col.get("signal_type")
    out = []
    for i, row in enumerate(rows[header_at + 1:], header_at + 2):
        if not row or not any(c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if type_col is not None and type_col < len(row) and row[type_col].strip().lower() not in ("", "pdq"):
            continue  # another signal type (video MD5, ...): not ours to match
        if hash_col >= len(row):
            raise ModerationError(f"line {i}: no value in the hash column")
        get = (lambda c: row[c] if c is not None and c < len(row) else None)
        out.append(_entry(i, row[hash_col], get(id_col), get(q_col)))
    return out


def format_bank(entries: list[BankEntry], fmt: BankFormat = BankFormat.CSV) -> str:
    """Write entries in ``fmt`` (``csv``: header ``signal_type,signal_value,id,quality``)."""
    fmt = BankFormat(fmt)
    if fmt == BankFormat.TE:
        return "".join(f"{e.hash.hex()}\n" for e in entries)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if fmt == BankFormat.CSV or fmt == BankFormat.AUTO:
        writer.writerow(["signal_type", "signal_value", "id", "quality"])
        for e in entries:
            writer.writerow(["pdq", e.hash.hex(), e.entry_id, "" if e.hash.quality is None else e.hash.quality])
    else:
        for e in entries:
            writer.writerow([e.hash.hex(), e.entry_id])
    return buf.getvalue()


# -- storage -----------------------------------------------------------------------------------


def _pointer_key(bank: str) -> str:
    return f"{ROOT}{bank}/CURRENT.json"


def import_bank(store: ObjectStore, bank: str, entries: list[BankEntry], *, source: str = "") -> BankVersion:
    """Publish ``entries`` as the new version of ``bank`` and point CURRENT at it; returns the pointer.

    An import identical to the version in force publishes nothing and
    returns that version. ModerationError for a reserved or malformed
    name, or an empty bank.
    """
    check_name(bank, importing=True)
    if not entries:
        raise ModerationError("the file holds no PDQ hash: nothing imported")
    data = format_bank(entries, BankFormat.CSV).encode()
    digest = sha256_hex(data)
    try:
        current = current_version(store, bank)
    except NotFoundError:
        current = None
    if current is not None and current.sha256 == digest:
        return current
    now = datetime.now(timezone.utc)
    version = f"{now.strftime('%Y%m%dT%H%M%S')}-{digest[:12]}"
    key = f"{ROOT}{bank}/versions/{version}.csv"
    store.put(key, data, "text/csv")
    record = BankVersion(bank, version, key, digest, len(entries), now.isoformat(timespec="seconds"), source)
    # The pointer goes last: until it is written, runs keep reading the previous version.
    store.put(_pointer_key(bank), json.dumps(asdict(record)).encode(), "application/json")
    return record


def current_version(store: ObjectStore, bank: str) -> BankVersion:
    """The pointer of ``bank``; NotFoundError if there is no such bank, IntegrityError if it is unreadable."""
    try:
        raw = json.loads(store.get(_pointer_key(check_name(bank))))
        return BankVersion(**raw)
    except NotFoundError:
        raise NotFoundError(f"no hash bank {bank!r}: import one with `moderation pdq import FILE --bank {bank}`") \
            from None
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"hash bank {bank!r}: its CURRENT pointer is unreadable ({exc})") from None


def load_bank(store: ObjectStore, bank: str) -> tuple[BankVersion, list[BankEntry]]:
    """The version in force of ``bank`` and its entries; IntegrityError if its bytes fail the pointer's check."""
    record = current_version(store, bank)
    data = store.get(record.key)
    if sha256_hex(data) != record.sha256:
        raise IntegrityError(f"hash bank {bank!r} version {record.version}: its sha256 does not match the pointer")
    return record, parse_bank(data.decode(), BankFormat.CSV)


def list_banks(store: ObjectStore) -> list[str]:
    """Names of the banks with a CURRENT pointer, sorted."""
    return sorted({k[len(ROOT):].split("/", 1)[0] for k in store.list(ROOT) if k.endswith("/CURRENT.json")})


def banks_index(store: ObjectStore) -> tuple[PdqIndex, dict[str, str]]:
    """All banks' hashes as one PDQ index (ids from :func:`reference_id`) and bank -> version used."""
    items, versions = [], {}
    for bank in list_banks(store):
        record, entries = load_bank(store, bank)
        versions[bank] = record.version
        items += [(reference_id(bank, e.entry_id), e.hash) for e in entries]
    return PdqIndex.from_hashes(items), versions


def index_entries(index: PdqIndex) -> list[BankEntry]:
    """A PDQ index's hashes as bank entries (to export the references' own hashes)."""
    return [BankEntry(i, PdqHash(bytes(code), None if q < 0 else int(q)))
            for i, code, q in zip(index.ids, index.codes, index.quality)]


__all__ = ["BankEntry", "BankFormat", "BankVersion", "HEX_LEN", "banks_index", "current_version", "format_bank",
           "import_bank", "list_banks", "load_bank", "parse_bank", "reference_id"]
