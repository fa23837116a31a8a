-- 0008: one moderator can no longer hold the whole queue.
--
-- review_claim took up to 1000 pairs at a time, any number of times, for up to a day:
-- review_claim(1000, null, 86400) locked everyone else out of the queue for 24 hours. Now:
--   * review_limits (one row, the database owner's to change; it is not a setting, so a
--     moderator's session cannot lift it) caps the pairs one moderator may hold under a live
--     claim (default 50) and the lease of any claim (default 3600 s);
--   * a lease argument above the cap is refused (22023, bad input), as one below 10 s always
--     was; the default lease (the setting moderation.claim_lease_seconds, else 900 s) is
--     lowered to the cap, so changing the cap never breaks claims that name no lease;
--   * review_claim(n) takes at most the room left under the cap (fewer rows than n, like an
--     emptying queue); when there is no room at all it raises 54000, so a front end can tell
--     "you hold too many" from "the queue is empty";
--   * review_claim_pair needs room for the pair unless the caller already holds it (a renewal);
--   * review_undo is not counted (it hands back one pair the caller decided) but its lease is
--     capped like any other.
-- An expired claim is no longer held (anyone may take it over), so it does not count.
-- One moderator's claims are serialised by an advisory lock, so two sessions of the same
-- moderator cannot both see room for the last pairs; different moderators never wait for each
-- other (the queue rows are still taken with SKIP LOCKED).
-- No percent character in this file (see 0002).

create table review_limits (
    only_row          boolean primary key default true check (only_row),
    max_held_pairs    integer not null default 50 check (max_held_pairs between 1 and 1000),
    max_lease_seconds integer not null default 3600 check (max_lease_seconds between 10 and 86400)
);
insert into review_limits default values;
comment on table review_limits is
    'Per-moderator claim limits read by review_claim, review_claim_pair and review_lease. '
    'Change with UPDATE review_limits SET ... (database owner).';

-- The lease of a new claim: the argument (refused above review_limits.max_lease_seconds),
-- else the database setting moderation.claim_lease_seconds, else 900 seconds (either lowered
-- to the cap: a session can set the setting, so it must not lift the cap).
create or replace function review_lease(p_seconds integer) returns interval
language plpgsql stable security definer as $$
declare
    cap integer := (select l.max_lease_seconds from review_limits l);
    secs integer := coalesce(p_seconds,
                             least(coalesce(nullif(current_setting('moderation.claim_lease_seconds', true),
                                                   '')::integer, 900), cap));
begin
    if secs < 10 or secs > cap then
        raise exception using errcode = '22023',
            message = 'claim lease must be between 10 and ' || cap || ' seconds, not ' || secs,
            hint = 'the most is review_limits.max_lease_seconds';
    end if;
    return make_interval(secs => secs);
end $$;

-- How many more pairs the moderator may claim now; raises 54000 when none. Takes the
-- moderator's claim lock (held until the caller's transaction ends).
create function review_claim_room(p_who text) returns integer
language plpgsql volatile security definer as $$
declare
    cap integer := (select l.max_held_pairs from review_limits l);
    held integer;
begin
    perform pg_advisory_xact_lock(hashtext('moderation.review_claim'), hashtext(p_who));
    select count(*) into held from review_claims c
     where c.moderator = p_who and c.ended_at is null and c.expires_at > now();
    if held >= cap then
        raise exception using errcode = '54000',
            message = 'moderator ' || quote_literal(p_who) || ' already holds ' || held
                      || ' pairs, the most one may hold at a time is ' || cap,
            hint = 'decide or release some first (review_release); the most is review_limits.max_held_pairs';
    end if;
    return cap - held;
end $$;

-- Claim the next p_n pending pairs (best first) for a lease, at most the room left under the
-- caller's cap. Pairs locked by another session's claim in progress are skipped, never waited
-- for; a pair whose claim has expired is taken over (the old claim ends as 'expired').
-- Returns the claims made (possibly fewer than p_n, or none when the queue is empty).
create or replace function review_claim(p_n integer default 10, p_moderator text default null,
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
    n integer;
begin
    if p_n is null or p_n < 1 or p_n > 1000 then
        raise exception using errcode = '22023', message = 'claim between 1 and 1000 pairs at a time';
    end if;
    n := least(p_n, review_claim_room(who));
    select array_agg(s.pair_id) into picked from (
        select q.pair_id from review_queue q
        join flagged_pairs fp on fp.id = q.pair_id
        where q.state = 'pending'
          and (q.claim_id is null or q.claim_expires_at <= now())
          and fp.run_id in (select v.run_id from review_visible_runs v)
        order by q.score desc, q.flagged_at, q.pair_id
        limit n
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
-- holds an unexpired claim, or if the caller has no room left under the cap. Claiming a
-- pair one holds under a live claim renews the lease and needs no room.
create or replace function review_claim_pair(p_pair_id bigint, p_moderator text default null,
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
    if not (q.claim_id is not null and q.claimed_by = who and q.claim_expires_at > now()) then
        perform review_claim_room(who);
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

-- CREATE OR REPLACE drops a function's SET clauses (not its grants): pin the search path of
-- every function defined here again, as 0002 does.
do $$
declare
    f text;
begin
    foreach f in array array['review_lease(integer)', 'review_claim_room(text)',
                             'review_claim(integer, text, integer)',
                             'review_claim_pair(bigint, text, integer)'] loop
        execute 'alter function ' || f || ' set search_path = '
                || quote_ident(current_schema()) || ', pg_temp';
    end loop;
    execute 'revoke all on function review_claim_room(text) from public';
end $$;

grant select on review_limits to moderation_moderator, moderation_pipeline;
