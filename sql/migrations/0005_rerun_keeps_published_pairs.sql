-- 0005: a rerun of a batch no longer takes the batch's pairs out of review until it completes.
--
-- match_runs.status is the state of the batch's latest attempt (running | complete | failed).
-- Before this migration the review queue offered a batch's pairs only while that latest
-- attempt was 'complete', so starting a rerun hid every pair of the day, and a rerun that died
-- without marking itself failed hid them for good. The pairs a batch has are always those its
-- last complete attempt published (Database.finish_run writes them and marks the run complete
-- in one transaction), so what decides whether they are offered is whether an attempt ever
-- completed: last_complete_at. A rerun's pairs replace them when it completes, in that same
-- transaction, and not before.
-- No percent character in this file (see 0002).

alter table match_runs add column last_complete_at timestamptz;

-- Backfill: a complete run, and any run that has pairs (a rerun that was stuck in 'running'
-- or failed when this migration ran: its pairs are those of an earlier complete attempt).
update match_runs r
   set last_complete_at = coalesce(r.finished_at, r.started_at)
 where r.status = 'complete'
    or exists (select 1 from flagged_pairs fp where fp.run_id = r.id);

-- The runs whose pairs a moderator may see: published at least once and not held back.
-- Same columns as 0003's view, so review_visible_runs (0004) and everything reading it follow.
create or replace view reviewable_runs as
select r.id as run_id, r.batch
from match_runs r
where r.last_complete_at is not null
  and not exists (select 1 from quality_holds h
                  where h.batch = r.batch and h.status <> 'released');
