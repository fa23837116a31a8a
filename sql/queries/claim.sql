-- Claim the next :n pending pairs (1..1000), best first, for the claim lease.
-- Pairs other moderators are claiming at this moment are skipped (FOR UPDATE SKIP LOCKED), so
-- no two moderators ever hold the same pair; an expired claim is taken over. May return fewer
-- than :n rows: none when the queue is empty, and never more than the room left under your cap
-- (review_limits.max_held_pairs, default 50 pairs under live claims); with no room left it
-- fails with "already holds N pairs" (decide or release some first).
-- Optional third argument: lease in seconds (10..review_limits.max_lease_seconds, default 3600;
-- more is refused), else moderation.claim_lease_seconds or 900, lowered to that cap.
-- Usage: psql "$REVIEW_DB" -v n=10 -v moderator= -f sql/queries/claim.sql
select * from review_claim(:n, :'moderator');
