-- 0002: the moderators' review queue.
--
-- What this adds (on top of 0001's flagged_pairs and review_decisions):
--   review_claims     who holds which pair, from when, until when; ended claims stay as history
--   review_queue      one row per flagged pair: its current state (a cache derived from the
--                     decision log by a trigger) and its current claim. Claims UPDATE this row,
--                     so FOR UPDATE SKIP LOCKED plus the re-check Postgres does on an updated
--                     row make it impossible for two sessions to take the same pair.
--   review_decisions  gains undoes (the decision an 'undo' row takes back) and is made
--                     append-only by triggers (no UPDATE, DELETE or TRUNCATE, for anyone).
--   views             review_pending, review_pair_context, review_run_summary,
--                     review_daily_summary, review_decision_log, review_open_claims,
--                     review_pair_state (state recomputed from the log, for audits)
--   functions         review_claim, review_claim_pair, review_release, review_decide,
--                     review_undo, review_my_claims (SECURITY DEFINER: the only way a
--                     moderator writes anything)
--   roles             moderation_moderator, moderation_pipeline, moderation_review_service
--
-- The documented statements a moderator runs are in sql/queries/.
-- Note: this file must not contain the percent character: the migration runner sends it
-- through a driver that treats it as a placeholder. Messages are built with ||.

-- ---------------------------------------------------------------------------------------
-- Tables
-- ---------------------------------------------------------------------------------------

create table review_claims (
    id          bigserial primary key,
    pair_id     bigint not null references flagged_pairs(id) on delete cascade,
    moderator   varchar(200) not null,
    claimed_at  timestamptz not null default now(),
    expires_at  timestamptz not null,
    ended_at    timestamptz,
    end_reason  varchar(20) check (end_reason in ('released', 'decided', 'expired')),
    check ((ended_at is null) = (end_reason is null))
);
-- At most one open claim per pair, whatever the code above it does.
create unique index review_claims_one_open_idx on review_claims (pair_id) where ended_at is null;
create index review_claims_moderator_open_idx on review_claims (moderator) where ended_at is null;

alter table review_decisions add column undoes bigint references review_decisions(id);
-- A decision is taken back at most once.
create unique index review_decisions_undoes_idx on review_decisions (undoes) where undoes is not null;
create index review_decisions_moderator_idx on review_decisions (moderator, id desc);
-- Decisions made before 0002 carry claim ids that never existed: checked for new rows only.
alter table review_decisions add constraint review_decisions_claim_fk
    foreign key (claim_id) references review_claims(id) not valid;

create table review_queue (
    pair_id          bigint primary key references flagged_pairs(id) on delete cascade,
    score            double precision not null,
    flagged_at       timestamptz not null,
    state            varchar(20) not null default 'pending'
                     check (state in ('pending', 'confirmed', 'rejected', 'unsure')),
    decision_id      bigint references review_decisions(id),
    claim_id         bigint references review_claims(id),
    claimed_by       varchar(200),
    claim_expires_at timestamptz,
    check ((claim_id is null) = (claimed_by is null) and (claim_id is null) = (claim_expires_at is null))
);
-- The queue order: score, then age. Partial, so decided pairs never slow a claim down.
create index review_queue_pending_idx on review_queue (score desc, flagged_at, pair_id)
    where state = 'pending';
create index review_queue_claimed_by_idx on review_queue (claimed_by) where claimed_by is not null;

-- ---------------------------------------------------------------------------------------
-- Keeping review_queue in step with flagged_pairs and review_decisions
-- ---------------------------------------------------------------------------------------

-- Statement-level with transition tables: one INSERT ... SELECT per pipeline statement,
-- so a day's million pairs cost one extra statement per chunk, not one per row.
create function review_queue_on_pairs_insert() returns trigger
language plpgsql security definer as $$
begin
    insert into review_queue (pair_id, score, flagged_at)
    select n.id, n.score, n.created_at from review_new_pairs n
    on conflict (pair_id) do nothing;
    return null;
end $$;

create function review_queue_on_pairs_update() returns trigger
language plpgsql security definer as $$
begin
    update review_queue q set score = n.score
    from review_new_pairs n
    where q.pair_id = n.id and q.score is distinct from n.score;
    return null;
end $$;

create trigger flagged_pairs_review_queue_ins after insert on flagged_pairs
    referencing new table as review_new_pairs
    for each statement execute function review_queue_on_pairs_insert();
create trigger flagged_pairs_review_queue_upd after update on flagged_pairs
    referencing new table as review_new_pairs
    for each statement execute function review_queue_on_pairs_update();

-- The state of a pair is its latest decision that has not been undone ('pending' if none).
-- SECURITY DEFINER so that views using it work for roles that cannot read the log itself.
create function review_current_decision(p_pair_id bigint) returns bigint
language sql stable security definer as $$
    select d.id from review_decisions d
    where d.pair_id = p_pair_id and d.decision <> 'undo'
      and not exists (select 1 from review_decisions u where u.undoes = d.id)
    order by d.id desc limit 1
$$;

create function review_decisions_derive_state() returns trigger
language plpgsql security definer as $$
declare
    cur bigint := review_current_decision(new.pair_id);
begin
    update review_queue q
       set decision_id = cur,
           state = coalesce((select d.decision from review_decisions d where d.id = cur), 'pending')
     where q.pair_id = new.pair_id;
    return null;
end $$;

create function review_decisions_append_only() returns trigger
language plpgsql as $$
begin
    raise exception using
        errcode = '42501',
        message = 'review_decisions is append-only: ' || tg_op || ' is not allowed',
        hint = 'record a new decision, or take one back with review_undo()';
end $$;

-- ---------------------------------------------------------------------------------------
-- Upgrade in place: existing pairs join the queue, legacy undo rows get their target
-- ---------------------------------------------------------------------------------------

-- An 'undo' written before 0002 has no undoes: it takes back the latest decision on
-- its pair that was still standing when it was written (stack order).
do $$
declare
    u record;
    target bigint;
begin
    for u in select id, pair_id from review_decisions
             where decision = 'undo' and undoes is null order by id loop
        select d.id into target from review_decisions d
        where d.pair_id = u.pair_id and d.id < u.id and d.decision <> 'undo'
          and not exists (select 1 from review_decisions x where x.undoes = d.id)
        order by d.id desc limit 1;
        if target is not null then
            update review_decisions set undoes = target where id = u.id;
        end if;
    end loop;
end $$;

insert into review_queue (pair_id, score, flagged_at)
select id, score, created_at from flagged_pairs
on conflict (pair_id) do nothing;

update review_queue q
   set decision_id = c.cur,
       state = d.decision
  from (select fp.id as pair_id, review_current_decision(fp.id) as cur
          from flagged_pairs fp
         where exists (select 1 from review_decisions x where x.pair_id = fp.id)) c
  join review_decisions d on d.id = c.cur
 where q.pair_id = c.pair_id;

-- Only now: the backfill above had to write undoes.
create trigger review_decisions_no_update before update or delete on review_decisions
    for each row execute function review_decisions_append_only();
create trigger review_decisions_no_truncate before truncate on review_decisions
    for each statement execute function review_decisions_append_only();
create trigger review_decisions_state after insert on review_decisions
    for each row execute function review_decisions_derive_state();

-- ---------------------------------------------------------------------------------------
-- Views a moderator queries
-- ---------------------------------------------------------------------------------------

-- Runs whose pairs are in review. A later migration narrows this (quality hold-back);
-- everything below reads runs through it, so that change is one CREATE OR REPLACE.
create view review_visible_runs as
select r.id as run_id from match_runs r where r.status = 'complete';

-- Pending pairs, best first (score, then age). A pair claimed by someone shows who holds
-- it and until when; an expired claim shows as unclaimed (the next claim takes it over).
create view review_pending as
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
       fp.heatmap_key
from review_queue q
join flagged_pairs fp on fp.id = q.pair_id
join match_runs r on r.id = fp.run_id
where q.state = 'pending'
  and fp.run_id in (select v.run_id from review_visible_runs v)
order by q.score desc, q.flagged_at, q.pair_id;

-- State recomputed from the log alone (for audits: it must always equal review_queue.state).
create view review_pair_state as
select fp.id as pair_id,
       coalesce(d.decision, 'pending') as state,
       d.id as decision_id,
       d.moderator as decided_by,
       d.decided_at
from flagged_pairs fp
left join review_decisions d on d.id = review_current_decision(fp.id);

-- Everything about one pair, for the moderator looking at it.
create view review_pair_context as
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
       r.threshold,
       r.model_version,
       r.stats_version,
       r.index_version,
       r.calibration_version,
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

-- Per run: flagged, reviewed, confirmed, rejected, unsure, pending, observed precision
-- (confirmed / (confirmed + rejected); 'unsure' counts as reviewed but not in precision).
create view review_run_summary as
select r.id as run_id,
       r.batch,
       r.status,
       r.started_at,
       r.finished_at,
       r.threshold,
       r.model_version,
       r.stats_version,
       r.index_version,
       count(q.pair_id) as flagged,
       count(*) filter (where q.state in ('confirmed', 'rejected', 'unsure')) as reviewed,
       count(*) filter (where q.state = 'confirmed') as confirmed,
       count(*) filter (where q.state = 'rejected') as rejected,
       count(*) filter (where q.state = 'unsure') as unsure,
       count(*) filter (where q.state = 'pending') as pending,
       (count(*) filter (where q.state = 'confirmed'))::double precision
           / nullif(count(*) filter (where q.state in ('confirmed', 'rejected')), 0) as observed_precision
from match_runs r
left join flagged_pairs fp on fp.run_id = r.id
left join review_queue q on q.pair_id = fp.id
group by r.id;

-- Per UTC day on which pairs were flagged, with the same counts.
create view review_daily_summary as
select (q.flagged_at at time zone 'UTC')::date as day,
       count(*) as flagged,
       count(*) filter (where q.state in ('confirmed', 'rejected', 'unsure')) as reviewed,
       count(*) filter (where q.state = 'confirmed') as confirmed,
       count(*) filter (where q.state = 'rejected') as rejected,
       count(*) filter (where q.state = 'unsure') as unsure,
       count(*) filter (where q.state = 'pending') as pending,
       (count(*) filter (where q.state = 'confirmed'))::double precision
           / nullif(count(*) filter (where q.state in ('confirmed', 'rejected')), 0) as observed_precision
from review_queue q
group by 1;

create view review_decision_log as
select id as decision_id, pair_id, moderator, decision, note, claim_id, undoes, decided_at
from review_decisions;

create view review_open_claims as
select c.id as claim_id, c.pair_id, c.moderator, c.claimed_at, c.expires_at,
       c.expires_at <= now() as expired
from review_claims c
where c.ended_at is null;

-- ---------------------------------------------------------------------------------------
-- Functions: the moderator's only write path
-- ---------------------------------------------------------------------------------------

-- Who is acting. A login moderator acts as itself; naming someone else needs
-- moderation_review_service (the CLI or a web front end that authenticates people itself).
create function review_actor(p_moderator text) returns text
language plpgsql stable security definer as $$
declare
    who text := coalesce(nullif(btrim(p_moderator), ''), session_user::text);
begin
    if length(who) > 200 or who ~ '[[:cntrl:]]' then
        raise exception using errcode = '22023',
            message = 'invalid moderator name: at most 200 characters, no control characters';
    end if;
    if who <> session_user::text
       and not pg_has_role(session_user, 'moderation_review_service', 'MEMBER') then
        raise exception using errcode = '42501',
            message = 'database user ' || quote_ident(session_user::text) || ' may not act as moderator '
                      || quote_literal(who),
            hint = 'connect as that moderator, or grant moderation_review_service to the service account';
    end if;
    return who;
end $$;

-- The lease of a new claim: the argument, else the database setting
-- moderation.claim_lease_seconds (ALTER DATABASE ... SET), else 900 seconds.
create function review_lease(p_seconds integer) returns interval
language plpgsql stable security definer as $$
declare
    secs integer := coalesce(p_seconds,
                             nullif(current_setting('moderation.claim_lease_seconds', true), '')::integer,
                             900);
begin
    if secs < 10 or secs > 86400 then
        raise exception using errcode = '22023',
            message = 'claim lease must be between 10 and 86400 seconds, not ' || secs;
    end if;
    return make_interval(secs => secs);
end $$;

-- Claim the next p_n pending pairs (best first) for a lease. Pairs locked by another
-- session's claim in progress are skipped, never waited for; a pair whose claim has
-- expired is taken over (the old claim ends as 'expired'). Returns the claims made
-- (possibly fewer than p_n, or none when the queue is empty).
create function review_claim(p_n integer default 10, p_moderator text default null,
                             p_lease_seconds integer default null)
returns table (claim_id bigint, pair_id bigint, run_id bigint, query_id varchar, reference_id varchar,
               score double precision, raw_score double precision, evidence_key text,
               heatmap_key text, expires_at timestamptz)
language plpgsql volatile security definer as $$
#variable_conflict use_column
declare
    who text := review_actor(p_moderator);
    lease interval := review_lease(p_lease_seconds);
    picked bigint[];
begin
    if p_n is null or p_n < 1 or p_n > 1000 then
        raise exception using errcode = '22023', message = 'claim between 1 and 1000 pairs at a time';
    end if;
    select array_agg(s.pair_id) into picked from (
        select q.pair_id from review_queue q
        join flagged_pairs fp on fp.id = q.pair_id
        where q.state = 'pending'
          and (q.claim_id is null or q.claim_expires_at <= now())
          and fp.run_id in (select v.run_id from review_visible_runs v)
        order by q.score desc, q.flagged_at, q.pair_id
        limit p_n
        for update of q skip locked) s;
    if picked is null then
        return;
    end if;
    -- Lock order everywhere: review_queue row first, then review_claims rows.
    update review_claims c set ended_at = now(), end_reason = 'expired'
     where c.pair_id = any(picked) and c.ended_at is null;
    return query
    with ins as (
        insert into review_claims (pair_id, moderator, claimed_at, expires_at)
        select x, who, now(), now() + lease from unnest(picked) as x
        returning review_claims.id, review_claims.pair_id, review_claims.expires_at
    ), upd as (
        update review_queue q
           set claim_id = ins.id, claimed_by = who, claim_expires_at = ins.expires_at
          from ins where q.pair_id = ins.pair_id
        returning q.pair_id
    )
    select ins.id, fp.id, fp.run_id, fp.query_id, fp.reference_id, fp.score, fp.raw_score,
           fp.evidence_key, fp.heatmap_key, ins.expires_at
      from ins join flagged_pairs fp on fp.id = ins.pair_id
     where ins.pair_id in (select upd.pair_id from upd)
     order by fp.score desc, fp.created_at, fp.id;
end $$;

-- Claim one named pair (for a second look at an 'unsure' pair, or a pair found through
-- review_pair_context). Waits for a claim in progress on it; refuses if someone else
-- holds an unexpired claim. Claiming a pair one already holds renews the lease.
create function review_claim_pair(p_pair_id bigint, p_moderator text default null,
                                  p_lease_seconds integer default null)
returns table (claim_id bigint, pair_id bigint, run_id bigint, query_id varchar, reference_id varchar,
               score double precision, raw_score double precision, evidence_key text,
               heatmap_key text, expires_at timestamptz)
language plpgsql volatile security definer as $$
#variable_conflict use_column
declare
    who text := review_actor(p_moderator);
    lease interval := review_lease(p_lease_seconds);
    q review_queue;
    cid bigint;
begin
    select * into q from review_queue rq where rq.pair_id = p_pair_id for update;
    if not found then
        raise exception using errcode = 'P0002', message = 'no flagged pair ' || p_pair_id;
    end if;
    if q.claim_id is not null and q.claimed_by <> who and q.claim_expires_at > now() then
        raise exception using errcode = '55P03',
            message = 'pair ' || p_pair_id || ' is claimed by ' || quote_literal(q.claimed_by)
                      || ' until ' || q.claim_expires_at;
    end if;
    if q.claim_id is not null and q.claimed_by = who then
        update review_claims c set expires_at = now() + lease where c.id = q.claim_id;
        cid := q.claim_id;
    else
        update review_claims c set ended_at = now(), end_reason = 'expired'
         where c.pair_id = p_pair_id and c.ended_at is null;
        insert into review_claims (pair_id, moderator, claimed_at, expires_at)
        values (p_pair_id, who, now(), now() + lease) returning id into cid;
    end if;
    update review_queue rq set claim_id = cid, claimed_by = who, claim_expires_at = now() + lease
     where rq.pair_id = p_pair_id;
    return query
    select c.id, fp.id, fp.run_id, fp.query_id, fp.reference_id, fp.score, fp.raw_score,
           fp.evidence_key, fp.heatmap_key, c.expires_at
      from review_claims c join flagged_pairs fp on fp.id = c.pair_id
     where c.id = cid;
end $$;

-- Give back claimed pairs (all of one's open claims when p_pair_ids is null).
-- Returns how many claims ended. Pairs one does not hold are ignored.
create function review_release(p_pair_ids bigint[] default null, p_moderator text default null)
returns integer
language plpgsql volatile security definer as $$
declare
    who text := review_actor(p_moderator);
    n integer;
begin
    perform 1 from review_queue q
     where q.claimed_by = who and (p_pair_ids is null or q.pair_id = any(p_pair_ids))
     order by q.pair_id
       for update;
    with rel as (
        update review_claims c set ended_at = now(), end_reason = 'released'
         where c.moderator = who and c.ended_at is null
           and (p_pair_ids is null or c.pair_id = any(p_pair_ids))
        returning c.id, c.pair_id
    )
    update review_queue q set claim_id = null, claimed_by = null, claim_expires_at = null
      from rel where q.pair_id = rel.pair_id and q.claim_id = rel.id;
    get diagnostics n = row_count;
    return n;
end $$;

-- Record a decision on a pair one holds a claim on; the claim ends ('decided') and the
-- pair's state follows. A claim past its lease still counts as long as nobody else has
-- taken the pair over. Returns the decision's id.
create function review_decide(p_pair_id bigint, p_decision text, p_note text default null,
                              p_moderator text default null)
returns bigint
language plpgsql volatile security definer as $$
declare
    who text := review_actor(p_moderator);
    q review_queue;
    did bigint;
begin
    if p_decision is null or p_decision not in ('confirmed', 'rejected', 'unsure') then
        raise exception using errcode = '22023',
            message = 'decision must be confirmed, rejected or unsure, not '
                      || coalesce(quote_literal(p_decision), 'null');
    end if;
    if p_note is not null and length(p_note) > 4000 then
        raise exception using errcode = '22023', message = 'note longer than 4000 characters';
    end if;
    select * into q from review_queue rq where rq.pair_id = p_pair_id for update;
    if not found then
        raise exception using errcode = 'P0002', message = 'no flagged pair ' || p_pair_id;
    end if;
    if q.claim_id is null or q.claimed_by <> who then
        raise exception using errcode = '55000',
            message = 'moderator ' || quote_literal(who) || ' holds no claim on pair ' || p_pair_id
                      || coalesce(' (it is claimed by ' || quote_literal(q.claimed_by) || ')', ''),
            hint = 'claim it first: review_claim() or review_claim_pair()';
    end if;
    insert into review_decisions (pair_id, moderator, decision, note, claim_id, decided_at)
    values (p_pair_id, who, p_decision, p_note, q.claim_id, now())
    returning id into did;
    update review_claims c set ended_at = now(), end_reason = 'decided' where c.id = q.claim_id;
    update review_queue rq set claim_id = null, claimed_by = null, claim_expires_at = null
     where rq.pair_id = p_pair_id;
    return did;
end $$;

-- Take back one's own latest standing decision. Refused when someone has decided the pair
-- since (undo theirs first) or holds a live claim on it. The pair comes back claimed by
-- the caller, so the decision can be made again at once. Repeating walks further back.
create function review_undo(p_moderator text default null, p_lease_seconds integer default null)
returns table (undo_id bigint, undone_id bigint, pair_id bigint, claim_id bigint, state varchar)
language plpgsql volatile security definer as $$
#variable_conflict use_column
declare
    who text := review_actor(p_moderator);
    lease interval := review_lease(p_lease_seconds);
    prev review_decisions;
    q review_queue;
    cid bigint;
    uid bigint;
begin
    -- One undo at a time per moderator, so two clicks never take back two decisions.
    perform pg_advisory_xact_lock(hashtext('moderation.review_undo'), hashtext(who));
    select d.* into prev from review_decisions d
     where d.moderator = who and d.decision <> 'undo'
       and not exists (select 1 from review_decisions u where u.undoes = d.id)
     order by d.id desc limit 1;
    if not found then
        raise exception using errcode = 'P0002',
            message = 'moderator ' || quote_literal(who) || ' has no decision to undo';
    end if;
    select * into q from review_queue rq where rq.pair_id = prev.pair_id for update;
    if q.decision_id is distinct from prev.id then
        raise exception using errcode = '55000',
            message = 'cannot undo decision ' || prev.id || ' on pair ' || prev.pair_id
                      || ': the pair has been decided again since',
            hint = 'the later decision must be undone by whoever made it';
    end if;
    if q.claim_id is not null and q.claimed_by <> who and q.claim_expires_at > now() then
        raise exception using errcode = '55P03',
            message = 'cannot undo: pair ' || prev.pair_id || ' is claimed by ' || quote_literal(q.claimed_by);
    end if;
    update review_claims c set ended_at = now(),
           end_reason = case when c.moderator = who then 'released' else 'expired' end
     where c.pair_id = prev.pair_id and c.ended_at is null;
    insert into review_claims (pair_id, moderator, claimed_at, expires_at)
    values (prev.pair_id, who, now(), now() + lease) returning id into cid;
    insert into review_decisions (pair_id, moderator, decision, note, claim_id, undoes, decided_at)
    values (prev.pair_id, who, 'undo', null, cid, prev.id, now())
    returning id into uid;
    update review_queue rq set claim_id = cid, claimed_by = who, claim_expires_at = now() + lease
     where rq.pair_id = prev.pair_id;
    return query select uid, prev.id, prev.pair_id, cid, rq.state
                   from review_queue rq where rq.pair_id = prev.pair_id;
end $$;

-- The caller's open claims (expired ones included: they still count until taken over).
create function review_my_claims(p_moderator text default null)
returns table (claim_id bigint, pair_id bigint, run_id bigint, query_id varchar, reference_id varchar,
               score double precision, raw_score double precision, evidence_key text,
               heatmap_key text, expires_at timestamptz)
language plpgsql stable security definer as $$
#variable_conflict use_column
declare
    who text := review_actor(p_moderator);
begin
    return query
    select c.id, fp.id, fp.run_id, fp.query_id, fp.reference_id, fp.score, fp.raw_score,
           fp.evidence_key, fp.heatmap_key, c.expires_at
      from review_claims c join flagged_pairs fp on fp.id = c.pair_id
     where c.moderator = who and c.ended_at is null
     order by fp.score desc, fp.created_at, fp.id;
end $$;

-- SECURITY DEFINER functions run with the owner's rights: pin their search path to this
-- schema (and pg_temp last) so a caller's objects can never stand in for ours.
do $$
declare
    f regprocedure;
begin
    for f in select p.oid::regprocedure from pg_proc p
             where p.pronamespace = current_schema()::regnamespace
               and p.proname in ('review_actor', 'review_lease', 'review_claim', 'review_claim_pair',
                                 'review_release', 'review_decide', 'review_undo', 'review_my_claims',
                                 'review_queue_on_pairs_insert', 'review_queue_on_pairs_update',
                                 'review_decisions_derive_state', 'review_current_decision',
                                 'review_decisions_append_only') loop
        execute 'alter function ' || f::text || ' set search_path = '
                || quote_ident(current_schema()) || ', pg_temp';
        execute 'revoke all on function ' || f::text || ' from public';
    end loop;
end $$;

-- ---------------------------------------------------------------------------------------
-- Roles (cluster-wide, so created only if missing; grants are per database)
-- ---------------------------------------------------------------------------------------

do $$
declare
    r text;
begin
    foreach r in array array['moderation_moderator', 'moderation_pipeline', 'moderation_review_service'] loop
        if not exists (select 1 from pg_roles where rolname = r) then
            begin
                execute 'create role ' || quote_ident(r) || ' nologin';
            exception when duplicate_object then
                null;  -- another database's migration created it just now
            end;
        end if;
    end loop;
end $$;

do $$
begin
    execute 'grant usage on schema ' || quote_ident(current_schema())
            || ' to moderation_moderator, moderation_pipeline, moderation_review_service';
end $$;

-- Moderators: read the views, write only through the functions.
grant select on review_pending, review_pair_context, review_run_summary, review_daily_summary,
                review_decision_log, review_open_claims, review_pair_state
   to moderation_moderator;
grant execute on function review_claim(integer, text, integer), review_claim_pair(bigint, text, integer),
                          review_release(bigint[], text), review_decide(bigint, text, text, text),
                          review_undo(text, integer), review_my_claims(text)
   to moderation_moderator;
-- Used inside review_pair_state; function rights are checked for the querying role.
grant execute on function review_current_decision(bigint) to moderation_moderator, moderation_pipeline;

-- A service account (the CLI, a web front end) may act for named moderators.
grant moderation_moderator to moderation_review_service;

-- The pipeline: records versions, writes runs and pairs, removes a rerun's stale undecided
-- pairs and prunes evidence keys; reads decisions (to keep decided pairs, for calibration)
-- but never writes them.
grant select, insert, update on model_versions, stats_versions, index_versions, calibrations,
                                match_runs, flagged_pairs
   to moderation_pipeline;
grant delete on flagged_pairs to moderation_pipeline;
grant usage, select on sequence match_runs_id_seq, flagged_pairs_id_seq to moderation_pipeline;
grant select on review_decisions, review_queue, review_claims to moderation_pipeline;
grant select on review_pending, review_pair_context, review_run_summary, review_daily_summary,
                review_decision_log, review_open_claims, review_pair_state
   to moderation_pipeline;
do $$
begin
    if to_regclass('schema_migrations') is not null then
        execute 'grant select on schema_migrations to moderation_pipeline, moderation_moderator';
    end if;
end $$;
