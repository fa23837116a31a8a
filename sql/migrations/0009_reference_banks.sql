-- 0009: reference banks, and switching a bank or a single reference off without an index rebuild.
--
-- A reference belongs to one named bank (one per source or policy). The index build decides the
-- bank from the object key (references/BANK/... ; directly under references/: 'default') or
-- from the operator's manifest references/banks.csv, and registers each bank it saw here.
-- What this adds:
--   flagged_pairs.bank          the bank of the pair's reference when it was flagged
--   flagged_pairs.query_sha256  the query's content hash (the false-positive allow-list, 0010,
--                               keys rejections on content, not on a file name)
--   reference_banks             the banks the latest index build saw, with their sizes
--   reference_control_log       append-only: every disable / enable of a bank or a reference
--                               (and, from 0010, every change of a reference's match policy),
--                               who, when, why. The current state is the latest entry per target;
--                               the matching job reads it at the start of every run, so a change
--                               takes effect at the next run, with no index rebuild.
--   views                       reference_disabled (the removal list), reference_bank_state,
--                               review_bank_summary; review_pending and review_pair_context
--                               gain the bank (as their last column)
--   functions                   reference_bank_disable / _enable, reference_disable / _enable
--                               (SECURITY DEFINER; executable by moderation_operator only)
--   role                        moderation_operator: decides what is matched. Moderators decide
--                               pairs; they cannot switch references off.
-- Pairs flagged before this migration have no bank and no query hash (they are not rewritten:
-- decided pairs are immutable, 0007).
-- No percent character in this file (see 0002).

alter table flagged_pairs
    add column bank         varchar(100),
    add column query_sha256 varchar(64);
create index flagged_pairs_bank_idx on flagged_pairs (bank);
create index flagged_pairs_sha_reference_idx on flagged_pairs (query_sha256, reference_id)
    where query_sha256 is not null;

create table reference_banks (
    name          varchar(100) primary key,
    n_references  integer not null default 0,
    index_version varchar(200),
    seen_at       timestamptz not null default now()
);

create table reference_control_log (
    id          bigserial primary key,
    target_kind varchar(20) not null check (target_kind in ('bank', 'reference')),
    target      varchar(300) not null,
    action      varchar(20) not null check (action in ('disable', 'enable', 'normal', 'strict', 'suppress')),
    min_inliers integer check (min_inliers is null or min_inliers between 1 and 100000),
    reason      text not null check (length(btrim(reason)) between 1 and 4000),
    changed_by  varchar(200) not null,
    changed_at  timestamptz not null default now(),
    -- A bank is only switched off and on; match policies are per reference.
    check (target_kind = 'reference' or action in ('disable', 'enable'))
);
create index reference_control_log_target_idx on reference_control_log (target_kind, target, id desc);

create function reference_control_log_append_only() returns trigger
language plpgsql as $$
begin
    raise exception using
        errcode = '42501',
        message = 'reference_control_log is append-only: ' || tg_op || ' is not allowed',
        hint = 'record the opposite change (enable after disable) with its reason';
end $$;
create trigger reference_control_log_no_update before update or delete on reference_control_log
    for each row execute function reference_control_log_append_only();
create trigger reference_control_log_no_truncate before truncate on reference_control_log
    for each statement execute function reference_control_log_append_only();

-- The removal list: banks and references whose latest on/off entry is 'disable'.
create view reference_disabled as
select s.target_kind, s.target, s.changed_by, s.changed_at, s.reason
from (select distinct on (l.target_kind, l.target) l.target_kind, l.target, l.action, l.changed_by,
             l.changed_at, l.reason
        from reference_control_log l
       where l.action in ('disable', 'enable')
       order by l.target_kind, l.target, l.id desc) s
where s.action = 'disable';

create view reference_bank_state as
select b.name as bank,
       b.n_references,
       b.index_version,
       b.seen_at,
       d.target is null as enabled,
       d.changed_by as disabled_by,
       d.changed_at as disabled_at,
       d.reason as disabled_reason
from reference_banks b
left join reference_disabled d on d.target_kind = 'bank' and d.target = b.name;

-- Per bank: flagged, reviewed, confirmed, rejected, unsure, pending, observed precision
-- (as review_run_summary). Pairs from before 0009 show under a null bank.
create view review_bank_summary as
with counts as (
    select fp.bank,
           count(*) as flagged,
           count(*) filter (where q.state in ('confirmed', 'rejected', 'unsure')) as reviewed,
           count(*) filter (where q.state = 'confirmed') as confirmed,
           count(*) filter (where q.state = 'rejected') as rejected,
           count(*) filter (where q.state = 'unsure') as unsure,
           count(*) filter (where q.state = 'pending') as pending
      from flagged_pairs fp
      join review_queue q on q.pair_id = fp.id
     group by fp.bank)
select coalesce(b.bank, c.bank) as bank,
       b.n_references,
       b.enabled,
       coalesce(c.flagged, 0) as flagged,
       coalesce(c.reviewed, 0) as reviewed,
       coalesce(c.confirmed, 0) as confirmed,
       coalesce(c.rejected, 0) as rejected,
       coalesce(c.unsure, 0) as unsure,
       coalesce(c.pending, 0) as pending,
       c.confirmed::double precision / nullif(c.confirmed + c.rejected, 0) as observed_precision
from reference_bank_state b
full join counts c on c.bank = b.bank;

-- 0002's review_pending with the bank appended.
create or replace view review_pending as
select q.pair_id,
       fp.run_id,
       r.batch,
       fp.query_id,
       fp.reference_id,
       fp.score,
       fp.raw_score,
       fp.rank,
       q.flagged_at,
       now() - q.flagged_at as age,
       case when q.claim_expires_at > now() then q.claimed_by end as claimed_by,
       case when q.claim_expires_at > now() then q.claim_expires_at end as claim_expires_at,
       fp.evidence_key,
       fp.heatmap_key,
       fp.bank
from review_queue q
join flagged_pairs fp on fp.id = q.pair_id
join match_runs r on r.id = fp.run_id
where q.state = 'pending'
  and fp.run_id in (select v.run_id from review_visible_runs v)
order by q.score desc, q.flagged_at, q.pair_id;

-- 0006's review_pair_context with the bank and the query's content hash appended.
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
       fp.query_sha256
from flagged_pairs fp
join match_runs r on r.id = fp.run_id
join review_queue q on q.pair_id = fp.id
left join review_decisions d on d.id = q.decision_id;

-- ---------------------------------------------------------------------------------------
-- The operator's write path
-- ---------------------------------------------------------------------------------------

-- One entry in the log, after the checks every change shares. Not granted to anyone: the
-- named wrappers below are the interface. Returns the entry's id.
create function reference_control_write(p_kind text, p_target text, p_action text, p_min_inliers integer,
                                        p_why text, p_by text)
returns bigint
language plpgsql volatile security definer as $$
declare
    who text := review_actor(p_by);
    lid bigint;
begin
    if p_why is null or btrim(p_why) = '' or length(p_why) > 4000 then
        raise exception using errcode = '22023',
            message = 'a reason (1 to 4000 characters) is required for every change',
            hint = 'say why: it is kept in reference_control_log';
    end if;
    if p_target is null or btrim(p_target) = '' or length(p_target) > 300 then
        raise exception using errcode = '22023', message = 'invalid ' || p_kind || ' name';
    end if;
    if p_kind = 'bank' and not exists (select 1 from reference_banks b where b.name = p_target) then
        raise exception using errcode = 'P0002',
            message = 'no reference bank ' || quote_literal(p_target),
            hint = 'banks are registered by the index build: see reference_bank_state';
    end if;
    insert into reference_control_log (target_kind, target, action, min_inliers, reason, changed_by)
    values (p_kind, p_target, p_action, p_min_inliers, btrim(p_why), who)
    returning id into lid;
    return lid;
end $$;

create function reference_bank_disable(p_bank text, p_why text, p_by text default null) returns bigint
language sql volatile security definer as $$
    select reference_control_write('bank', p_bank, 'disable', null, p_why, p_by)
$$;

create function reference_bank_enable(p_bank text, p_why text, p_by text default null) returns bigint
language sql volatile security definer as $$
    select reference_control_write('bank', p_bank, 'enable', null, p_why, p_by)
$$;

create function reference_disable(p_reference_id text, p_why text, p_by text default null) returns bigint
language sql volatile security definer as $$
    select reference_control_write('reference', p_reference_id, 'disable', null, p_why, p_by)
$$;

create function reference_enable(p_reference_id text, p_why text, p_by text default null) returns bigint
language sql volatile security definer as $$
    select reference_control_write('reference', p_reference_id, 'enable', null, p_why, p_by)
$$;

do $$
declare
    f regprocedure;
begin
    for f in select p.oid::regprocedure from pg_proc p
             where p.pronamespace = current_schema()::regnamespace
               and p.proname in ('reference_control_write', 'reference_bank_disable', 'reference_bank_enable',
                                 'reference_disable', 'reference_enable',
                                 'reference_control_log_append_only') loop
        execute 'alter function ' || f::text || ' set search_path = '
                || quote_ident(current_schema()) || ', pg_temp';
        execute 'revoke all on function ' || f::text || ' from public';
    end loop;
end $$;

do $$
begin
    if not exists (select 1 from pg_roles where rolname = 'moderation_operator') then
        begin
            create role moderation_operator nologin;
        exception when duplicate_object then
            null;  -- another database's migration created it just now
        end;
    end if;
    execute 'grant usage on schema ' || quote_ident(current_schema()) || ' to moderation_operator';
end $$;

grant execute on function reference_bank_disable(text, text, text), reference_bank_enable(text, text, text),
                          reference_disable(text, text, text), reference_enable(text, text, text)
   to moderation_operator;
grant select on reference_banks, reference_control_log, reference_disabled, reference_bank_state,
                review_bank_summary
   to moderation_operator, moderation_pipeline;
-- Operators judge a bank by what moderators made of its pairs.
grant select on review_run_summary, review_daily_summary, review_pending, review_pair_context
   to moderation_operator;
-- Moderators see which bank a pair comes from and how each bank fares; they cannot change it.
grant select on reference_bank_state, review_bank_summary to moderation_moderator;
-- The index build registers the banks it saw; the matching job reads the log.
grant insert, update on reference_banks to moderation_pipeline;
