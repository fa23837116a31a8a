-- Claim the next :n pending pairs (1..1000), best first, for the claim lease.
-- Pairs other moderators are claiming at this moment are skipped (FOR UPDATE SKIP LOCKED), so
-- no two moderators ever hold the same pair; an expired claim is taken over. May return fewer
-- than :n rows, or none when the queue is empty.
-- Optional third argument: lease in seconds (10..86400), else moderation.claim_lease_seconds or 900.
-- Usage: psql "$REVIEW_DB" -v n=10 -v moderator= -f sql/queries/claim.sql
select * from review_claim(:n, :'moderator');
