-- Record a decision on a pair you hold: 'confirmed' (a copy), 'rejected' (not a copy) or
-- 'unsure'; the note is optional (-v note= for none; at most 4000 characters).
-- Your claim ends; the decision is appended to the audit trail with the claim it came from.
-- Returns the decision id. Fails if you hold no claim on the pair.
-- Usage: psql "$REVIEW_DB" -v pair_id=123 -v decision=confirmed -v note='same photo, cropped' \
--          -v moderator= -f sql/queries/decide.sql
select review_decide(:pair_id, :'decision', nullif(:'note', ''), :'moderator') as decision_id;
