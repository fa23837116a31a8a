-- 0012: which signal flagged a pair: the descriptor ('sscd'), a PDQ hash ('pdq'), or both.
--
-- PDQ (moderation.pdq) runs beside the descriptor and flags a pair on its own when the two
-- hashes are within MODERATION_PDQ_MAX_DISTANCE bits, also when the descriptor's score is below
-- the threshold, and against hash-only references imported from a hash bank (reference_id
-- 'hashbank:BANK:ID', no reference_key). Moderators need to see which signal spoke, and the
-- threshold feedback must leave out pairs the threshold never chose. pdq_distance is the
-- Hamming distance in bits when PDQ matched, null otherwise.
-- Existing pairs were all flagged by the descriptor: the default says so. Adding columns
-- is no UPDATE, so decided pairs (0007) are untouched; the trigger compares whole rows and so
-- freezes these columns too.
-- No percent character in this file (see 0002).

alter table flagged_pairs
    add column match_source varchar(8) not null default 'sscd'
        constraint flagged_pairs_match_source_check check (match_source in ('sscd', 'pdq', 'both')),
    add column pdq_distance smallint
        constraint flagged_pairs_pdq_distance_check check (pdq_distance between 0 and 256);

-- 0009's view, with the two columns appended (create or replace view only adds at the end).
create or replace view review_pair_context as
select fp.id as pair_id,
       fp.run_id,
       r.batch,
       r.status as run_status,
       (r.started_at at time zone 'UTC')::date as run_date,
       r.started_at as run_started_at,
       r.finished_at as run_finished_at,
       fp.query_id,
       fp.reference_id,
       fp.query_key,
       fp.reference_key,
       fp.raw_score,
       fp.score,
       fp.rank,
       fp.threshold,
       fp.model_version,
       fp.stats_version,
       fp.index_version,
       fp.calibration_version,
       fp.evidence_key,
       fp.heatmap_key,
       fp.created_at as flagged_at,
       q.state,
       d.decision as current_decision,
       d.moderator as decided_by,
       d.decided_at,
       d.note as decision_note,
       case when q.claim_expires_at > now() then q.claimed_by end as claimed_by,
       case when q.claim_expires_at > now() then q.claim_expires_at end as claim_expires_at,
       (select coalesce(json_agg(json_build_object(
                   'decision_id', h.id, 'moderator', h.moderator, 'decision', h.decision,
                   'note', h.note, 'claim_id', h.claim_id, 'undoes', h.undoes,
                   'decided_at', h.decided_at) order by h.id), '[]'::json)
          from review_decisions h where h.pair_id = fp.id) as history,
       (select coalesce(json_agg(json_build_object(
                   'pair_id', o.id, 'run_id', o.run_id, 'query_id', o.query_id,
                   'score', o.score, 'decision', od.decision, 'moderator', od.moderator,
                   'note', od.note, 'decided_at', od.decided_at) order by od.id), '[]'::json)
          from flagged_pairs o
          join review_queue oq on oq.pair_id = o.id
          join review_decisions od on od.id = oq.decision_id
         where o.reference_id = fp.reference_id and o.id <> fp.id) as reference_decisions,
       fp.bank,
       fp.query_sha256,
       fp.match_source,
       fp.pdq_distance
from flagged_pairs fp
join match_runs r on r.id = fp.run_id
join review_queue q on q.pair_id = fp.id
left join review_decisions d on d.id = q.decision_id;
