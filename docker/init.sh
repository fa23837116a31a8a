#!/usr/bin/env bash
# One-shot initialisation, run by the compose service `init` before anything else:
#   1. create the review database and its role if missing (idempotent);
#   2. migrate Airflow's metadata database;
#   3. create the `gpu` pool the retraining task is routed to;
#   4. migrate the review database (sql/migrations) and create the bucket,
#      both through the library, reading the same Airflow connections the DAGs use.
set -euo pipefail

: "${POSTGRES_HOST:=postgres}" "${POSTGRES_USER:?}" "${POSTGRES_PASSWORD:?}"
: "${REVIEW_DB:=moderation}" "${REVIEW_DB_USER:=moderation}" "${REVIEW_DB_PASSWORD:?}"
export PGPASSWORD="$POSTGRES_PASSWORD"

for _ in $(seq 1 60); do pg_isready -h "$POSTGRES_HOST" -U "$POSTGRES_USER" -q && break; sleep 1; done

psql -v ON_ERROR_STOP=1 -h "$POSTGRES_HOST" -U "$POSTGRES_USER" -d postgres \
     -v db="$REVIEW_DB" -v role="$REVIEW_DB_USER" -v pw="$REVIEW_DB_PASSWORD" <<'SQL'
select format('create role %I login password %L', :'role', :'pw')
 where not exists (select 1 from pg_roles where rolname = :'role') \gexec
select format('create database %I owner %I', :'db', :'role')
 where not exists (select 1 from pg_database where datname = :'db') \gexec
SQL

airflow db migrate
airflow pools set gpu "${GPU_POOL_SLOTS:-1}" "GPU training (sscd_retrain)"

python - <<'PY'
from airflow.models.connection import Connection

from moderation import orchestration
from moderation.jobs import Pipeline

settings = orchestration.settings_from_connections(
    Connection.get_connection_from_secrets(orchestration.DB_CONN_ID).to_dict(),
    Connection.get_connection_from_secrets(orchestration.S3_CONN_ID).to_dict())
p = Pipeline.open(settings)  # applies sql/migrations, creates the bucket
p.store.check()
print(f"review database migrated; bucket ready at {p.store.url}")
PY
echo "init done"
