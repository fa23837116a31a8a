-- Take back your own latest decision that still stands. An 'undo' row is appended (nothing is
-- deleted); the pair's state goes back to what it was and the pair comes back claimed by you,
-- so you can decide again. Repeat to walk further back. Refused if someone decided the pair
-- after you, or holds it now.
-- Usage: psql "$REVIEW_DB" -v moderator= -f sql/queries/undo.sql
select * from review_undo(:'moderator');
