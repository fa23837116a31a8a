-- The pairs you hold (claims past their lease are listed until someone takes the pair over).
-- Usage: psql "$REVIEW_DB" -v moderator= -f sql/queries/my_claims.sql
select * from review_my_claims(:'moderator');
