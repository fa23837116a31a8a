-- Per match run and per day (UTC day the pairs were flagged): flagged, reviewed (incl. unsure),
-- confirmed, rejected, unsure, pending, and observed precision = confirmed / (confirmed + rejected).
-- Usage: psql "$REVIEW_DB" -v days=14 -f sql/queries/summaries.sql
select run_id, batch, status, started_at, threshold, flagged, reviewed, confirmed, rejected,
       unsure, pending, round(observed_precision::numeric, 3) as observed_precision
from review_run_summary
order by started_at desc
limit :days;

select day, flagged, reviewed, confirmed, rejected, unsure, pending,
       round(observed_precision::numeric, 3) as observed_precision
from review_daily_summary
order by day desc
limit :days;
