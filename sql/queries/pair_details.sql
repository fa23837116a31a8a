-- One pair with its full context: query and reference ids and object keys, raw and normalised
-- scores, the run (batch, date, threshold), model / statistics / index / calibration versions,
-- evidence and heatmap object keys, its state, who holds it, its decision history and the
-- standing decisions on other pairs with the same reference.
-- (`moderation review show PAIR_ID --urls` adds openable links to the evidence.)
-- Usage: psql "$REVIEW_DB" -x -v pair_id=123 -f sql/queries/pair_details.sql
select * from review_pair_context where pair_id = :pair_id;
