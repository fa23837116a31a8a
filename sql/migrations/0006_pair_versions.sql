-- 0006: each flagged pair records the versions that scored it.
--
-- A batch has one match_runs row, and a rerun rewrites its model, statistics, index and
-- calibration versions and its threshold. Pairs a rerun keeps (decided ones) were scored by an
-- earlier attempt, so reading their versions from the run showed a decision as made on a score
-- from a model that never produced it. The pipeline now writes the versions and threshold of
-- the attempt that scored a pair onto the pair itself (Database.finish_run), and the views read
-- them from there. The run row keeps describing the batch's latest attempt.
-- No percent character in this file (see 0002).

alter table flagged_pairs
    add column model_version       varchar(200) references model_versions(version),
    add column stats_version       varchar(200) references stats_versions(version),
    add column index_version       varchar(200) references index_versions(version),
    add column calibration_version varchar(200),
    add column threshold           double precision;

-- Pairs written before this migration: their run's versions are the best that is known (for a
-- decided pair that survived a rerun with other versions, the true ones were never recorded).
update flagged_pairs fp
   set model_version = r.model_version,
       stats_version = r.stats_version,
       index_version = r.index_version,
       calibration_version = r.calibration_version,
       threshold = r.threshold
  from match_runs r
 where r.id = fp.run_id;

alter table flagged_pairs
    alter column model_version set not null,
    alter column stats_version set not null,
    alter column index_version set not null,
    alter column threshold set not null;

-- Feedback reads decisions per (model, statistics): calibrate --from-decisions, label export.
create index flagged_pairs_versions_idx on flagged_pairs (model_version, stats_version);

-- The same view as 0002's, with the scoring columns taken from the pair instead of the run.
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
         where o.reference_id = fp.reference_id and o.id <> fp.id) as reference_decisions
from flagged_pairs fp
join match_runs r on r.id = fp.run_id
join review_queue q on q.pair_id = fp.id
left join review_decisions d on d.id = q.decision_id;
