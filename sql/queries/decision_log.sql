-- The audit trail of one pair: every decision and undo, who, when, from which claim.
-- (Drop the where clause for everything, newest first.)
-- Usage: psql "$REVIEW_DB" -v pair_id=123 -f sql/queries/decision_log.sql
select decision_id, pair_id, moderator, decision, note, claim_id, undoes, decided_at
from review_decision_log
where pair_id = :pair_id
order by decision_id desc;
