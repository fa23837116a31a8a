-- 0007: a pair with a moderator's decision is immutable, for every role.
--
-- The pipeline may update and delete flagged pairs (a rerun rescores undecided ones and
-- removes those it no longer flags), and nothing stopped it, or anyone else with UPDATE, from
-- re-pointing a confirmed pair to another reference or changing its score: the decision would
-- then stand on a pair it was never made on. A pair that has any decision in the log (even
-- one taken back: the log still refers to what was seen) can no longer change, except that
-- its evidence keys may be cleared (evidence pruning deletes the images of old decisions).
-- A new score is a new pair; a rerun leaves a decided pair as it is (Database.finish_run).
-- Deleting a decided pair was already refused by review_decisions' foreign key; the trigger
-- gives the reason. Like the append-only log, it applies to the table owner and superusers
-- too; only session_replication_role = replica (superuser, for restores) bypasses it.
-- No percent character in this file (see 0002).

-- SECURITY DEFINER: the check must work for a writer that cannot read the decisions itself.
create function flagged_pairs_decided_immutable() returns trigger
language plpgsql security definer as $$
begin
    if not exists (select 1 from review_decisions d where d.pair_id = old.id) then
        return case when tg_op = 'DELETE' then old else new end;
    end if;
    -- Every column but the evidence keys is compared, so a column added later is frozen too.
    if tg_op = 'UPDATE'
       and to_jsonb(new) - 'evidence_key' - 'heatmap_key' = to_jsonb(old) - 'evidence_key' - 'heatmap_key'
       and (new.evidence_key is null or new.evidence_key = old.evidence_key)
       and (new.heatmap_key is null or new.heatmap_key = old.heatmap_key) then
        return new;
    end if;
    raise exception using
        errcode = '42501',
        message = 'flagged pair ' || old.id || ' has a moderator''s decision: ' || tg_op
                  || ' is not allowed (only its evidence keys may be cleared)',
        hint = 'a new score is a new pair: the decision stays with the pair it was made on';
end $$;

create trigger flagged_pairs_decided_immutable before update or delete on flagged_pairs
    for each row execute function flagged_pairs_decided_immutable();

do $$
begin
    execute 'alter function flagged_pairs_decided_immutable() set search_path = '
            || quote_ident(current_schema()) || ', pg_temp';
    execute 'revoke all on function flagged_pairs_decided_immutable() from public';
end $$;
