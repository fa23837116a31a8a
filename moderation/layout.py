"""Names shared by the DAG files and :mod:`moderation.orchestration`.

The DAG files read these at parse time (connection ids, default prefixes of
their parameters, the DAG ids named in skip messages). The dag-processor
parses every DAG file every few minutes, so this module imports nothing: it
must stay cheap to import.
"""

DB_CONN_ID = "moderation_db"
S3_CONN_ID = "moderation_s3"

REFERENCES_PREFIX = "references/"
BACKGROUND_PREFIX = "background/"
QUERIES_PREFIX = "queries/"
TRAINING_PREFIX = "training/"
VALIDATION_PREFIX = "validation/"
CALIBRATION_PREFIX = "calibration/"
PROFILES_PREFIX = "quality/profiles/"

# The DAG that produces each prerequisite, named when a run has to wait for it.
STATS_DAG = "background_stats_refresh"
INDEX_DAG = "reference_index_nightly"
MATCHING_DAG = "query_matching_daily"
RETRAIN_DAG = "sscd_retrain"
