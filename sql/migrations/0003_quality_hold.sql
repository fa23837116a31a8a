-- 0003: hold-back of a match run's flagged pairs by the data-quality gates.
--
-- A batch (match_runs.batch) with a row here whose status is not 'released'
-- keeps its flagged pairs out of the review queue. The matching DAG inserts
-- a 'pending' hold before it writes the pairs and the flagged-pairs gate
-- releases it when it passes; a failing gate (e.g. a sudden spike in the
-- day's flagged count) turns it into 'held' until an operator releases it.
-- Keyed by batch, not run id, so that the hold exists before the run row does
-- and survives a rerun of the same day.

create table quality_holds (
    batch        varchar(300) primary key,
    status       varchar(20) not null check (status in ('pending', 'held', 'released')),
    reason       text not null default '',
    details      json not null default '{}',
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now(),
    released_by  varchar(200),
    released_at  timestamptz
);
create index quality_holds_open_idx on quality_holds (status) where status <> 'released';

-- The runs whose pairs a moderator may see: complete and not held back.
-- The review queue joins flagged_pairs.run_id to this view (or uses the same
-- predicate). Only key columns, so later changes to match_runs never need it
-- recreated.
create view reviewable_runs as
select r.id as run_id, r.batch
from match_runs r
where r.status = 'complete'
  and not exists (select 1 from quality_holds h
                  where h.batch = r.batch and h.status <> 'released');
