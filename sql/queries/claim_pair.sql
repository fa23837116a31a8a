-- Claim one pair by id, whatever its state (e.g. a second opinion on an 'unsure' pair).
-- Fails if someone else holds an unexpired claim on it, or if you already hold as many pairs as
-- review_limits.max_held_pairs allows; renews your own claim (that needs no room).
-- Usage: psql "$REVIEW_DB" -v pair_id=123 -v moderator= -f sql/queries/claim_pair.sql
select * from review_claim_pair(:pair_id, :'moderator');
