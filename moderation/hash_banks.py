"""PDQ hash banks: hash lists received from other teams (no images), stored, versioned and matched.

File formats (read by :func:`parse_bank`, written by :func:`format_bank`), each
the layout a tool of Meta's ThreatExchange project reads or writes for PDQ:

- ``tx``: python-threatexchange's signal lines, ``pdq HASH`` (the signal
  type's name, one space, 64 lowercase hex characters): what
  ``threatexchange hash photo`` prints and what its ``local_file``
  collaboration reads and appends to. Reading also takes bare hashes (a
  ``local_file`` collaboration configured with a signal type;
  ``threatexchange dataset -P -S -s pdq``), skips lines of other signal
  types (``video_md5 ...``), and ignores what follows the hash after a blank
  (``threatexchange dataset -P`` adds the collaboration and its opinion).
  No ids: an entry's id is its hash.
- ``hashes``: one bare hash a line, for ``threatexchange match photo --hashes
  -S pdq FILE`` (write only; ``tx`` reads it).
- ``pdq``: the PDQ reference tools' hash files (``pdq-photo-hasher`` writes
  ``HASH,QUALITY,FILENAME``, or ``hash=HASH,norm=..,delta=..,quality=Q,
  filename=F`` with ``--details``; ``mih-query``, ``clusterize256`` read
  ``HASH[,metadata]``): the filename, else the whole metadata, is the id.
- ``csv``: ``threatexchange dataset -P --csv``, header
  ``signal_type,signal_str,collab,category,tags``; rows of other signal types
  and ``NEGATIVE_CLASS`` rows (the collaboration says such matches do not
  belong) are skipped. Also read: any header naming a hash column
  (``signal_str``, ``signal_value``, ``signal``, ``hash``, ``pdq``) with
  optional ``id`` / ``signal_id`` / ``content_id`` / ``bank_content_id`` and
  ``quality`` columns (this project's earlier exports). Written with ``id`` and
  ``quality`` columns after TE's five.
- ``hma``: JSON, one object a line (or one array), as hasher-matcher-actioner's
  curation API speaks it: the body of ``POST /c/bank/NAME/signal``
  (``{"pdq": HASH, "note": ...}``) or the answer of ``GET
  /c/bank/NAME/content/ID?include_signals=true`` (``{"id": ID, "signals":
  {"pdq": HASH, ...}, "disable_until_ts": ...}``). The id is HMA's content id,
  else the note; content without a PDQ signal, or disabled in HMA
  (``disable_until_ts`` 0 or in the future), is skipped. Written as POST
  bodies with our id as the note, to replay against HMA's API one line a
  request.

``auto`` (the default for reading) decides from the first line that is not
blank or a ``#`` comment: ``{`` or ``[`` -> ``hma``; ``NAME HASH`` or a bare
hash -> ``tx``; ``HASH,...`` or ``hash=`` -> ``pdq``; anything else is a CSV
header. An entry without an id gets its hash as id. Any malformed line makes
the whole import fail with its line number (a bank is imported completely or
not at all).

Storage: a bank version is one canonical CSV object
``hashbanks/NAME/versions/VERSION.csv`` (header
``signal_type,signal_value,id,quality``); ``hashbanks/NAME/CURRENT.json``,
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
_HASH_COLUMNS = ("signal_str", "signal_value", "signal", "hash", "pdq", "pdq_hash")
_ID_COLUMNS = ("id", "signal_id", "content_id", "bank_content_id")
# python-threatexchange's name of the PDQ signal type (SignalType.get_name()), in every format that names one.
SIGNAL_TYPE = "pdq"
# The columns of `threatexchange dataset -P --csv`.
TX_CSV_COLUMNS = ("signal_type", "signal_str", "collab", "category", "tags")
_CANONICAL_HEADER = ("signal_type", "signal_value", "id", "quality")
# Reference ids of bank entries in flagged pairs: never an image reference's id (a file stem has no ':').
ID_PREFIX = "hashbank:"


class BankFormat(str, Enum):
    """The file layouts of :func:`parse_bank` / :func:`format_bank` (module docstring: where each comes from)."""

    AUTO = "auto"  # read only
    TX = "tx"
    HASHES = "hashes"  # write only (``tx`` reads it)
    PDQ = "pdq"
    CSV = "csv"
    HMA = "hma"


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
    """The entries of a bank file in ``fmt``; ModerationError naming the first bad line.

    Entries keep file order; a repeated id keeps its first hash (and is
    reported as an error if the hashes differ). ``hashes`` files are read as
    ``tx`` (a bare hash is a ``tx`` line).
    """
    fmt = BankFormat(fmt)
    lines = text.splitlines()
    if fmt == BankFormat.AUTO:
        fmt = detect_format(lines)
    if fmt == BankFormat.CSV:
        entries = _parse_csv(text)
    elif fmt == BankFormat.HMA:
        entries = _parse_hma(text, lines)
    elif fmt == BankFormat.PDQ:
        entries = _parse_pdq_tool(lines)
    else:
        entries = _parse_tx(lines)
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


def detect_format(lines: list[str]) -> BankFormat:
    """The format of a file from its first line that is not blank or a ``#`` comment (csv for an empty file)."""
    first = next((ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")), "")
    if first.startswith(("{", "[")):
        return BankFormat.HMA
    words = first.split()
    if words and (_looks_like_hash(words[0])
                  or len(words) >= 2 and _SIGNAL_NAME.match(words[0]) and _looks_like_hash(words[1])):
        return BankFormat.TX
    head = first.split(",", 1)[0]
    if _looks_like_hash(head) or head.lower().startswith("hash="):
        return BankFormat.PDQ
    return BankFormat.CSV


_SIGNAL_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # SignalType.get_name(): lower_with_underscores


def _looks_like_hash(token: str) -> bool:
    try:
        PdqHash.from_hex(token)
        return True
    except ValueError:
        return False


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


def _content_lines(lines: list[str]):
    for lineno, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield lineno, line.strip()


def _parse_tx(lines: list[str]) -> list[tuple[int, BankEntry]]:
    out = []
    for lineno, line in _content_lines(lines):
        words = line.split()
        if len(words) == 1 or _looks_like_hash(words[0]):  # a bare hash (what follows it is not the signal)
            out.append(_entry(lineno, words[0], None))
            continue
        if not _SIGNAL_NAME.match(words[0]):
            raise ModerationError(f"line {lineno}: expected 'pdq HASH' (or a bare hash), got {line[:80]!r}")
        if words[0] == SIGNAL_TYPE:
            out.append(_entry(lineno, words[1], None))
        # another signal type (video_md5, ...): not ours to match
    return out


def _parse_pdq_tool(lines: list[str]) -> list[tuple[int, BankEntry]]:
    out = []
    for lineno, line in _content_lines(lines):
        head, _, meta = line.partition(",")
        if head.lower().startswith("hash="):  # pdq-photo-hasher --details: key=value fields
            fields = dict(f.partition("=")[::2] for f in line.split(","))
            fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
            out.append(_entry(lineno, fields.get("hash", ""), fields.get("filename"), fields.get("quality") or None))
            continue
        quality, _, filename = meta.partition(",")
        if quality.strip().isdigit() and filename.strip():  # pdq-photo-hasher: HASH,QUALITY,FILENAME
            out.append(_entry(lineno, head, filename, quality.strip()))
        else:  # any other metadata, as mih-query keeps it: the id
            out.append(_entry(lineno, head, meta))
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
        raise ModerationError(f"CSV header {rows[header_at]!r} has no hash column (one of {', '.join(_HASH_COLUMNS)}); "
                              "pass --format if this is not a CSV file")
    id_col = next((col[c] for c in _ID_COLUMNS if c in col), None)
    q_col, type_col, category_col = col.get("quality"), col.get("signal_type"), col.get("category")
    out = []
    for i, row in enumerate(rows[header_at + 1:], header_at + 2):
        if not row or not any(c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        get = (lambda c: row[c].strip() if c is not None and c < len(row) else None)
        if (get(type_col) or SIGNAL_TYPE).lower() != SIGNAL_TYPE:
            continue  # another signal type (video MD5, ...): not ours to match
        if (get(category_col) or "").upper() == "NEGATIVE_CLASS":
            continue  # the collaboration says matches of this signal do not belong
        if hash_col >= len(row):
            raise ModerationError(f"line {i}: no value in the hash column")
        out.append(_entry(i, row[hash_col], get(id_col), get(q_col)))
    return out


def _parse_hma(text: str, lines: list[str]) -> list[tuple[int, BankEntry]]:
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise ModerationError(f"line {getattr(exc, 'lineno', 1)}: not JSON ({exc})") from None
        objects = [(1, item) for item in items] if isinstance(items, list) else [(1, items)]
    else:
        objects = []
        for lineno, line in _content_lines(lines):
            try:
                objects.append((lineno, json.loads(line)))
            except ValueError as exc:
                raise ModerationError(f"line {lineno}: not a JSON object ({exc})") from None
    now = datetime.now(timezone.utc).timestamp()
    out = []
    for lineno, obj in objects:
        if not isinstance(obj, dict):
            raise ModerationError(f"line {lineno}: expected a JSON object, got {type(obj).__name__}")
        signals = obj.get("signals") if isinstance(obj.get("signals"), dict) else obj
        value = signals.get(SIGNAL_TYPE)
        if value is None:
            continue  # content with other signal types only (video_md5, ...)
        disabled_until = obj.get("disable_until_ts")
        if isinstance(disabled_until, int) and disabled_until != 1 and (disabled_until == 0 or disabled_until > now):
            continue  # switched off in HMA: it does not match there either
        if not isinstance(value, str):
            raise ModerationError(f"line {lineno}: the {SIGNAL_TYPE!r} signal must be a string")
        entry_id = obj.get("id") if obj.get("id") is not None else obj.get("note")
        out.append(_entry(lineno, value, None if entry_id is None else str(entry_id)))
    return out


def format_bank(entries: list[BankEntry], fmt: BankFormat = BankFormat.CSV, *, bank: str = "") -> str:
    """Write entries in ``fmt`` (``bank`` fills the ``collab`` column of ``csv``); ModerationError for ``auto``."""
    fmt = BankFormat(fmt)
    if fmt == BankFormat.TX:
        return "".join(f"{SIGNAL_TYPE} {e.hash.hex()}\n" for e in entries)
    if fmt == BankFormat.HASHES:
        return "".join(f"{e.hash.hex()}\n" for e in entries)
    if fmt == BankFormat.HMA:
        return "".join(json.dumps({SIGNAL_TYPE: e.hash.hex(), "note": e.entry_id}) + "\n" for e in entries)
    if fmt == BankFormat.PDQ:
        return "".join(f"{e.hash.hex()},{'' if e.hash.quality is None else str(e.hash.quality) + ','}{e.entry_id}\n"
                       for e in entries)
    if fmt != BankFormat.CSV:
        raise ModerationError(f"cannot write format {fmt.value!r}: choose tx, hashes, pdq, csv or hma")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*TX_CSV_COLUMNS, "id", "quality"])
    for e in entries:
        writer.writerow([SIGNAL_TYPE, e.hash.hex(), bank, "POSITIVE_CLASS", "", e.entry_id,
                         "" if e.hash.quality is None else e.hash.quality])
    return buf.getvalue()


def _canonical(entries: list[BankEntry]) -> bytes:
    """A bank version's stored bytes (kept apart from the export formats: its sha256 is the version's identity)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_CANONICAL_HEADER)
    for e in entries:
        writer.writerow([SIGNAL_TYPE, e.hash.hex(), e.entry_id, "" if e.hash.quality is None else e.hash.quality])
    return buf.getvalue().encode()


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
    data = _canonical(entries)
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
