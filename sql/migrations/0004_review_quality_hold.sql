-- 0004: the review queue honours the data-quality hold-back (0003's reviewable_runs).
--
-- 0002 reads runs through review_visible_runs (complete runs). Here it becomes exactly
-- reviewable_runs: complete and not held back, so a day whose flagged count spiked stays
-- out of review_pending and out of review_claim until an operator releases it. Same
-- columns, so the views and functions built on it need no change.
-- Written to apply whether or not 0003 is present (it is a no-op without it).
-- No percent character in this file (see 0002).

do $$
begin
    if to_regclass('reviewable_runs') is not null then
        execute 'create or replace view review_visible_runs as '
                || 'select v.run_id::bigint as run_id from reviewable_runs v';
    end if;
end $$;
