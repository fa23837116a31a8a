-- 0011: retroactive matching (moderation/retroactive.py).
--
-- When the nightly index adds references, the recent query batches are searched for copies of
-- those references only. Their pairs go into a run row of their own, one per source batch,
-- named 'retro/' || batch, with retro_of naming the batch whose queries they came from. That row
-- is written by adding pairs only (never by replacing them), so every night's finds accumulate
-- and a rerun adds nothing; the daily run of the batch itself is left untouched. Its
-- index_version is the last index searched for the batch: the next night searches only the
-- references that index did not hold.
-- A pair is retroactive when its run's retro_of is set (review_pair_context shows the run's batch).
-- No percent character in this file (see 0002).

alter table match_runs add column retro_of varchar(300);
create index match_runs_retro_of_idx on match_runs (retro_of) where retro_of is not null;
