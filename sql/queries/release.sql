-- Give back all the pairs you hold, unused; they return to the queue at once.
-- For some pairs only: select review_release(array[123, 124]::bigint[], :'moderator');
-- Returns how many claims ended.
-- Usage: psql "$REVIEW_DB" -v moderator= -f sql/queries/release.sql
select review_release(null, :'moderator') as released;
