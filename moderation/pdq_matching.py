"""PDQ as a match signal of its own in the daily run: what to search, and how its pairs join the descriptor's.

The references searched are the pinned index version's own PDQ hashes
(``pdq.npz``, written by the index build) plus every hash bank in force
(:mod:`moderation.hash_banks`, read when the run starts; the versions used
are recorded in the run's ``matching.json``).

A pair is flagged when the descriptor flags it (``match_source`` 'sscd'),
when PDQ matches it ('pdq'), or both ('both'). A PDQ-only pair carries the
descriptor's scores and rank for that pair when the descriptor ranked the
reference among the query's candidates (its score is then below the
threshold), else ``raw_score = score = 0.0`` and ``rank = 0``: rank 0 means
"not among the descriptor's candidates", and such a pair is no evidence
about the threshold (threshold feedback leaves PDQ-only pairs out).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from moderation.db import FlaggedPair
from moderation.matching import Candidate
from moderation.pdq import PdqConfig, PdqHash, PdqIndex, PdqMatch

log = logging.getLogger(__name__)

PDQ_FILE = "pdq.npz"  # the index version's file of reference PDQ hashes


def run_index(p, index_version) -> tuple[PdqIndex, dict]:
    """The PDQ hashes a run matches against: the index version's references and all banks; and what they are.

    ``p`` is the Pipeline. An index version built without PDQ contributes
    no hashes (logged: rebuild the index). Raises IntegrityError for a bank
    whose stored bytes fail their check, StoreError if the store is down.
    """
    from moderation.hash_banks import banks_index
    from moderation.registry import Kind

    if PDQ_FILE in index_version.files:
        refs = PdqIndex.from_bytes(p.registry.load(Kind.INDEX, index_version, PDQ_FILE))
    else:
        log.warning("index %s has no PDQ hashes (built with MODERATION_PDQ off or before PDQ existed): "
                    "PDQ matches only hash banks until the index is rebuilt", index_version.version)
        refs = PdqIndex.from_hashes([])
    banks, versions = banks_index(p.store)
    return refs.concat(banks), {"references": len(refs), "bank_hashes": len(banks), "banks": versions}


def match(index: PdqIndex, queries: Mapping[str, PdqHash], config: PdqConfig) -> list[PdqMatch]:
    """Every PDQ match of the queries (query id -> hash) in ``index`` under ``config``."""
    return index.search(list(queries.items()), config.max_distance, config.min_quality)


def merge_pairs(chosen: Sequence[Candidate], candidates: Sequence[Candidate], matches: Sequence[PdqMatch],
                query_keys: Mapping[str, str], locations: Mapping[str, str]) -> list[FlaggedPair]:
    """The run's flagged pairs: the descriptor's ``chosen`` ones and the PDQ ``matches``, each pair once.

    ``candidates`` are all the descriptor's candidates (for the scores of
    PDQ-only pairs), ``query_keys``/``locations`` the query and reference
    locations by id (a hash-bank reference has none).
    """
    distance = {(m.query_id, m.reference_id): m.distance for m in matches}
    scored = {(c.query_id, c.reference_id): c for c in candidates}
    out = []
    for c in chosen:
        d = distance.get((c.query_id, c.reference_id))
        out.append(FlaggedPair(c.query_id, c.reference_id, c.raw_score, c.score, c.rank,
                               query_key=query_keys.get(c.query_id), reference_key=locations.get(c.reference_id),
                               match_source="sscd" if d is None else "both", pdq_distance=d))
    done = {(c.query_id, c.reference_id) for c in chosen}
    for m in matches:
        key = (m.query_id, m.reference_id)
        if key in done:
            continue
        done.add(key)
        c = scored.get(key)
        out.append(FlaggedPair(m.query_id, m.reference_id, c.raw_score if c else 0.0, c.score if c else 0.0,
                               c.rank if c else 0, query_key=query_keys.get(m.query_id),
                               reference_key=locations.get(m.reference_id), match_source="pdq",
                               pdq_distance=m.distance))
    return out
