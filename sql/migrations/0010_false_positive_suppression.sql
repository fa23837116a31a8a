-- 0010: false-positive suppression (the allow-list).
--
-- Two rules, applied by the matching job to every pair above the threshold before it is written:
--   * a pair whose query content (flagged_pairs.query_sha256, 0009) and reference a moderator
--     has rejected (the pair's standing decision is 'rejected') is not flagged again, in any
--     later run or rerun of any batch. Undoing the rejection lifts it.
--   * a reference that keeps producing rejected pairs (a template, a logo, a meme frame) can be
--     given a match policy: 'strict' (its pairs are flagged only with at least N geometric
--     inliers: the policy's own N, else MODERATION_STRICT_MIN_INLIERS) or 'suppress' (never
--     flagged); 'normal' takes the policy back. Changes go to 0009's reference_control_log.
-- What the job suppressed is kept in the run's artifacts (runs/BATCH/suppressed.csv, with the
-- reason), never dropped silently.
-- What this adds:
--   views      review_rejected_pairs (the allow-list), reference_policies (policy in force),
--              review_reference_rejections (references by number of rejected pairs, to decide on)
--   functions  reference_set_policy (moderation_operator only)
-- No percent character in this file (see 0002).

create view review_rejected_pairs as
select fp.query_sha256, fp.reference_id,
       count(*) as rejected_pairs,
       max(d.decided_at) as last_rejected_at
from flagged_pairs fp
join review_queue q on q.pair_id = fp.id
join review_decisions d on d.id = q.decision_id
where q.state = 'rejected' and fp.query_sha256 is not null
group by fp.query_sha256, fp.reference_id;

create view reference_policies as
select s.reference_id, s.policy, s.min_inliers, s.changed_by, s.changed_at, s.reason
from (select distinct on (l.target) l.target as reference_id, l.action as policy, l.min_inliers,
             l.changed_by, l.changed_at, l.reason
        from reference_control_log l
       where l.target_kind = 'reference' and l.action in ('normal', 'strict', 'suppress')
       order by l.target, l.id desc) s
where s.policy <> 'normal';

-- References by rejected pairs (standing decisions), most first, with what else is known.
create view review_reference_rejections as
select fp.reference_id,
       max(fp.bank) as bank,
       count(*) filter (where q.state = 'rejected') as rejected,
       count(*) filter (where q.state = 'confirmed') as confirmed,
       count(*) filter (where q.state = 'pending') as pending,
       count(distinct fp.query_sha256) filter (where q.state = 'rejected') as rejected_queries,
       (count(*) filter (where q.state = 'confirmed'))::double precision
           / nullif(count(*) filter (where q.state in ('confirmed', 'rejected')), 0) as observed_precision,
       coalesce(max(p.policy), 'normal') as policy,
       max(p.min_inliers) as min_inliers,
       exists (select 1 from reference_disabled x
                where x.target_kind = 'reference' and x.target = fp.reference_id) as disabled
from flagged_pairs fp
join review_queue q on q.pair_id = fp.id
left join reference_policies p on p.reference_id = fp.reference_id
group by fp.reference_id
having count(*) filter (where q.state = 'rejected') > 0
order by rejected desc, confirmed, fp.reference_id;

create function reference_set_policy(p_reference_id text, p_policy text, p_why text,
                                     p_min_inliers integer default null, p_by text default null)
returns bigint
language plpgsql volatile security definer as $$
begin
    if p_policy is null or p_policy not in ('normal', 'strict', 'suppress') then
        raise exception using errcode = '22023',
            message = 'policy must be normal, strict or suppress, not '
                      || coalesce(quote_literal(p_policy), 'null');
    end if;
    if p_min_inliers is not null and (p_policy <> 'strict' or p_min_inliers not between 1 and 100000) then
        raise exception using errcode = '22023',
            message = 'min_inliers (1 to 100000) goes with the strict policy only';
    end if;
    return reference_control_write('reference', p_reference_id, p_policy, p_min_inliers, p_why, p_by);
end $$;

do $$
begin
    execute 'alter function reference_set_policy(text, text, text, integer, text) set search_path = '
            || quote_ident(current_schema()) || ', pg_temp';
end $$;
revoke all on function reference_set_policy(text, text, text, integer, text) from public;
grant execute on function reference_set_policy(text, text, text, integer, text) to moderation_operator;

grant select on review_rejected_pairs, reference_policies, review_reference_rejections
   to moderation_operator, moderation_pipeline;
grant select on review_reference_rejections to moderation_moderator;
