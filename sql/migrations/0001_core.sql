-- 0001: versions, match runs, flagged pairs, review decisions.
-- Must agree with the SQLAlchemy models in moderation/db.py
-- (tests/test_db_schema.py compares them).

create table model_versions (
    version      varchar(200) primary key,
    backbone     varchar(100) not null,
    dim          integer not null,
    image_size   integer not null,
    resize_mode  varchar(20) not null,
    source       varchar(50) not null,
    threshold    double precision,
    metrics      json not null default '{}',
    created_at   timestamptz not null default now()
);

create table stats_versions (
    version       varchar(200) primary key,
    model_version varchar(200) not null references model_versions(version),
    postprocess   varchar(20) not null,
    in_dim        integer not null,
    out_dim       integer not null,
    n_background  integer not null,
    created_at    timestamptz not null default now()
);

create table index_versions (
    version       varchar(200) primary key,
    model_version varchar(200) not null references model_versions(version),
    stats_version varchar(200) not null references stats_versions(version),
    count         integer not null,
    dim           integer not null,
    factory       varchar(200) not null,
    created_at    timestamptz not null default now()
);

create table calibrations (
    version          varchar(200) primary key,
    model_version    varchar(200) not null references model_versions(version),
    stats_version    varchar(200) not null references stats_versions(version),
    threshold        double precision not null,
    target_precision double precision not null,
    source           varchar(50) not null,
    metrics          json not null default '{}',
    created_at       timestamptz not null default now()
);

-- One row per batch (a day's prefix, a folder): a rerun updates it in place.
create table match_runs (
    id                  bigserial primary key,
    batch               varchar(300) not null unique,
    status              varchar(20) not null check (status in ('running', 'complete', 'failed')),
    model_version       varchar(200) not null references model_versions(version),
    stats_version       varchar(200) not null references stats_versions(version),
    index_version       varchar(200) not null references index_versions(version),
    calibration_version varchar(200),
    threshold           double precision not null,
    n_queries           integer not null default 0,
    n_failed            integer not null default 0,
    n_candidates        integer not null default 0,
    n_flagged           integer not null default 0,
    failures            json not null default '{}',
    candidates_key      text,
    started_at          timestamptz not null default now(),
    finished_at         timestamptz
);

create table flagged_pairs (
    id            bigserial primary key,
    run_id        bigint not null references match_runs(id),
    query_id      varchar(300) not null,
    reference_id  varchar(300) not null,
    query_key     text,
    reference_key text,
    raw_score     double precision not null,
    score         double precision not null,
    rank          integer not null,
    evidence_key  text,
    heatmap_key   text,
    created_at    timestamptz not null default now(),
    constraint flagged_pairs_run_query_reference_key unique (run_id, query_id, reference_id)
);
create index flagged_pairs_score_idx on flagged_pairs (score desc);
create index flagged_pairs_reference_idx on flagged_pairs (reference_id);

-- Append-only audit trail; a pair's state is derived from its decisions.
create table review_decisions (
    id         bigserial primary key,
    pair_id    bigint not null references flagged_pairs(id),
    moderator  varchar(200) not null,
    decision   varchar(20) not null check (decision in ('confirmed', 'rejected', 'unsure', 'undo')),
    note       text,
    claim_id   bigint,
    decided_at timestamptz not null default now()
);
create index review_decisions_pair_idx on review_decisions (pair_id, decided_at desc);
