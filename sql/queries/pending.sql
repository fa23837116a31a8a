-- The review queue: pending pairs, highest normalised score first, then oldest.
-- claimed_by / claim_expires_at show pairs someone is working on (expired claims show as free).
-- Usage: psql "$REVIEW_DB" -v limit=20 -f sql/queries/pending.sql
select pair_id, score, raw_score, query_id, reference_id, batch, flagged_at, age,
       claimed_by, claim_expires_at, evidence_key, heatmap_key
from review_pending
limit :limit;
