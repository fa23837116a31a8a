"""Reference banks: the named set (a source, a policy) each reference belongs to.

The bank of a reference is decided at index build from where the image
lives, relative to the references root (the ``--prefix`` such as
``references/``, or the ``--images`` folder):

- ``BANK/.../x.jpg`` belongs to bank ``BANK`` (the first folder);
- ``x.jpg`` directly under the root belongs to bank ``default``;
- a manifest ``banks.csv`` at the root overrides both. It has a header
  ``prefix,bank`` and one rule per row; a reference whose relative location
  starts with ``prefix`` belongs to ``bank``, and the longest matching prefix
  wins (``prefix`` may be a folder such as ``partner-a/`` or a whole key).

Bank names are 1-100 characters of letters, digits, ``_ . -``. The index
version keeps the id -> bank map (``banks.json``); flagged pairs carry
their reference's bank. Switching banks off and on is
:mod:`moderation.reference_controls`.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from moderation.errors import ModerationError
from moderation.images import ImageRef

DEFAULT_BANK = "default"
MANIFEST_NAME = "banks.csv"
_BANK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class BankError(ModerationError):
    """A malformed bank manifest or bank name."""


def check_bank_name(name: str) -> str:
    """``name`` if it is a valid bank name; BankError otherwise."""
    if not isinstance(name, str) or not _BANK_NAME.match(name):
        raise BankError(f"invalid bank name {name!r}: 1-100 letters, digits, '_', '.', '-', "
                        "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class BankRules:
    """Manifest rules ``(prefix, bank)``, longest prefix first; empty: the folder rule alone."""

    rules: tuple[tuple[str, str], ...] = ()

    def bank_of(self, relative: str) -> str:
        """The bank of a reference at ``relative`` (a '/'-separated path under the references root)."""
        relative = relative.lstrip("/")
        for prefix, bank in self.rules:
            if relative.startswith(prefix):
                return bank
        head, sep, _ = relative.partition("/")
        if not sep or not _BANK_NAME.match(head):
            return DEFAULT_BANK
        return head

    @classmethod
    def parse(cls, text: str) -> BankRules:
        """Rules from a manifest's text; BankError naming the line when one is malformed."""
        reader = csv.reader(io.StringIO(text))
        header = [h.strip().lower() for h in next(reader, [])]
        if header[:2] != ["prefix", "bank"]:
            raise BankError(f"{MANIFEST_NAME}: the first line must be 'prefix,bank', not {','.join(header)!r}")
        rules: dict[str, str] = {}
        for line, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < 2 or not row[0].strip():
                raise BankError(f"{MANIFEST_NAME} line {line}: expected 'prefix,bank'")
            prefix = row[0].strip().lstrip("/")
            try:
                bank = check_bank_name(row[1].strip())
            except BankError as exc:
                raise BankError(f"{MANIFEST_NAME} line {line}: {exc}") from None
            if rules.get(prefix, bank) != bank:
                raise BankError(f"{MANIFEST_NAME} line {line}: prefix {prefix!r} is given two banks")
            rules[prefix] = bank
        return cls(tuple(sorted(rules.items(), key=lambda kv: (-len(kv[0]), kv[0]))))


def _root_of(source) -> tuple[str, object] | None:
    """("folder", Path) or ("store", (settings, prefix)) for the sources banks understand; None otherwise."""
    source = getattr(source, "inner", source)  # test wrappers keep the real source here
    if getattr(source, "root", None) is not None:
        return "folder", Path(source.root)
    if getattr(source, "prefix", None) is not None and getattr(source, "settings", None) is not None:
        return "store", (source.settings, source.prefix)
    return None


def relative_location(source, location: str) -> str:
    """``location`` relative to the source's root ('/'-separated); the location itself if unknown."""
    root = _root_of(source)
    if root is None:
        return location
    kind, value = root
    if kind == "folder":
        try:
            return Path(location).resolve().relative_to(Path(value).resolve()).as_posix()
        except ValueError:
            return Path(location).name
    prefix = value[1]
    return location[len(prefix):] if location.startswith(prefix) else location


def load_rules(source) -> BankRules:
    """The manifest rules at the source's root (no manifest, or a source without a root: none)."""
    root = _root_of(source)
    if root is None:
        return BankRules()
    kind, value = root
    if kind == "folder":
        path = Path(value) / MANIFEST_NAME
        return BankRules.parse(path.read_text(encoding="utf-8")) if path.is_file() else BankRules()
    from moderation.store import open_store

    settings, prefix = value
    store = open_store(settings)
    key = prefix + MANIFEST_NAME if not prefix or prefix.endswith("/") else f"{prefix}/{MANIFEST_NAME}"
    if not store.exists(key):
        return BankRules()
    return BankRules.parse(store.get(key).decode("utf-8"))


def assign_banks(source, refs: Iterable[ImageRef]) -> dict[str, str]:
    """Reference id -> bank for ``refs`` read from ``source`` (rules: module docstring).

    Raises BankError on a malformed manifest, so a typo never silently moves
    references into another bank.
    """
    rules = load_rules(source)
    return {r.image_id: rules.bank_of(relative_location(source, r.location)) for r in refs}
