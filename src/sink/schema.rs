//! The PostgreSQL schema: created by `migrate` and on every start
//! (idempotent), under an advisory lock so several gateways may start at once.
//!
//! Constraints from the scaling plan (deploy/SCALING.md): every unique index on a
//! device table includes `device_id` (Citus distributes by it), and new
//! partitions are created on the parent table only.

use tokio_postgres::Client;

/// Advisory lock key serialising DDL across gateway instances.
pub const DDL_LOCK: i64 = 0x6564_6765_6777; // "edgegw"

/// The DDL for `schema`. The name must already be a validated identifier.
pub fn ddl(schema: &str) -> String {
    format!(
        r#"
-- CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even when the
-- schema exists; a gateway role that only has the schema must get past it.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = '{s}') THEN
        CREATE SCHEMA {s};
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS {s}.readings (
    time      timestamptz      NOT NULL,
    device_id text             NOT NULL,
    metric    text             NOT NULL,
    value     double precision,
    unit      text,
    vs        text,
    vb        boolean,
    vd        bytea,
    sum       double precision
) PARTITION BY RANGE (time);
COMMENT ON TABLE {s}.readings IS 'Every reading, range-partitioned by time. value is NULL for SenML string (vs), boolean (vb), data (vd) and sum-only records.';
CREATE INDEX IF NOT EXISTS readings_device_time_idx ON {s}.readings (device_id, time);

CREATE TABLE IF NOT EXISTS {s}.alerts (
    time      timestamptz      NOT NULL,
    device_id text             NOT NULL,
    metric    text             NOT NULL,
    rule      text             NOT NULL,
    state     text             NOT NULL,
    value     double precision,
    detail    jsonb
);
CREATE INDEX IF NOT EXISTS alerts_device_time_idx ON {s}.alerts (device_id, time);

CREATE TABLE IF NOT EXISTS {s}.rollups_1m (
    bucket    timestamptz      NOT NULL,
    device_id text             NOT NULL,
    metric    text             NOT NULL,
    count     bigint           NOT NULL,
    min       double precision,
    max       double precision,
    avg       double precision,
    PRIMARY KEY (device_id, metric, bucket)
);

CREATE TABLE IF NOT EXISTS {s}.dead_letters (
    received_at timestamptz NOT NULL,
    topic       text        NOT NULL,
    device_id   text,
    payload     bytea       NOT NULL,
    reason      text        NOT NULL,
    error       text        NOT NULL
);

CREATE TABLE IF NOT EXISTS {s}.device_watermarks (
    device_id  text        NOT NULL PRIMARY KEY,
    seq        bigint      NOT NULL,
    seen       bytea       NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE {s}.device_watermarks ADD COLUMN IF NOT EXISTS boot bigint;
ALTER TABLE {s}.device_watermarks ADD COLUMN IF NOT EXISTS epoch bigint NOT NULL DEFAULT 0;
ALTER TABLE {s}.device_watermarks ADD COLUMN IF NOT EXISTS newest bigint NOT NULL DEFAULT -9223372036854775808;
COMMENT ON TABLE {s}.device_watermarks IS 'Highest committed native message sequence per device (seq) in its current boot (boot: the id the device sends, if any; epoch: restarts seen), which of the 1024 below it were committed (seen, a bitmap), and the newest reading time accepted (newest, microseconds since the epoch). Pruned past dedup.horizon_secs.';
CREATE INDEX IF NOT EXISTS device_watermarks_updated_idx ON {s}.device_watermarks (updated_at);
CREATE INDEX IF NOT EXISTS dead_letters_received_idx ON {s}.dead_letters (received_at);
CREATE INDEX IF NOT EXISTS rollups_1m_bucket_idx ON {s}.rollups_1m (bucket);

CREATE TABLE IF NOT EXISTS {s}.gateway_meta (
    key   text NOT NULL PRIMARY KEY,
    value text NOT NULL
);
COMMENT ON TABLE {s}.gateway_meta IS 'schema_version, and instance_id: a random id made when the schema was created, recorded in every spool so that a spool is never replayed into another database.';
INSERT INTO {s}.gateway_meta VALUES ('instance_id', gen_random_uuid()::text) ON CONFLICT DO NOTHING;
INSERT INTO {s}.gateway_meta VALUES ('schema_version', '{v}')
    ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;

CREATE TABLE IF NOT EXISTS {s}.message_ids (
    device_id   text        NOT NULL,
    hash        bytea       NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (device_id, hash)
);
COMMENT ON TABLE {s}.message_ids IS 'Identities (128-bit hash of device and payload) of recently committed messages without a sequence, to drop redeliveries.';
CREATE INDEX IF NOT EXISTS message_ids_received_idx ON {s}.message_ids (received_at);

CREATE TABLE IF NOT EXISTS {s}.applied_batches (
    run        bigint      NOT NULL,
    seq        bigint      NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run, seq)
);
COMMENT ON TABLE {s}.applied_batches IS 'Batches committed recently, so a retried or replayed batch is never applied twice.';
"#,
        s = schema,
        v = SCHEMA_VERSION
    )
}

/// Bumped whenever [`ddl`] changes; a database at this version gets no DDL.
pub const SCHEMA_VERSION: i32 = 2;

/// Creates (if missing) a publication over `readings` (published as the
/// parent table, whatever partition a row is in) and `alerts`, for logical
/// replication and CDC tools. Subscribers need `wal_level = logical`. Only
/// inserts are published: retention deletes stay local (and need no
/// replica identity).
///
/// # Errors
/// Any database error.
pub async fn create_publication(
    client: &Client,
    schema: &str,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    let exists: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await?
        .get(0);
    if exists == 0 {
        client
            .batch_execute(&format!(
                "CREATE PUBLICATION {name} FOR TABLE {schema}.readings, {schema}.alerts \
                 WITH (publish_via_partition_root = true, publish = 'insert')"
            ))
            .await?;
    }
    Ok(())
}

/// Tables the gateway needs.
pub const TABLES: [&str; 8] = [
    "gateway_meta",
    "readings",
    "alerts",
    "rollups_1m",
    "dead_letters",
    "device_watermarks",
    "message_ids",
    "applied_batches",
];

/// Creates the schema and tables if any is missing. When all exist, no DDL
/// runs, so a gateway role that owns only `readings` (see
/// `deploy/sql/roles.sql`) starts without needing to own the rest.
///
/// # Errors
/// Any database error.
pub async fn create(client: &mut Client, schema: &str) -> Result<(), tokio_postgres::Error> {
    let present: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = ANY($2)",
            &[&schema, &TABLES.to_vec()],
        )
        .await?
        .get(0);
    if present == TABLES.len() as i64 {
        let version = client
            .query_opt(
                &format!("SELECT value FROM {schema}.gateway_meta WHERE key = 'schema_version'"),
                &[],
            )
            .await?
            .map(|row| row.get::<_, String>(0));
        if version.as_deref() == Some(SCHEMA_VERSION.to_string().as_str()) {
            return Ok(());
        }
    }
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&DDL_LOCK])
        .await?;
    tx.batch_execute(&ddl(schema)).await?;
    tx.commit().await
}

/// The device tables Citus distributes by `device_id`, co-located with
/// `readings`: a device's readings, alerts, rollups and dedup state live on
/// one worker, so its batch commits there as one unit.
pub const DISTRIBUTED: [&str; 5] = [
    "readings",
    "alerts",
    "rollups_1m",
    "device_watermarks",
    "message_ids",
];

/// True when the Citus extension is installed in the connected database.
///
/// # Errors
/// Any database error.
pub async fn is_citus(client: &Client) -> Result<bool, tokio_postgres::Error> {
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_extension WHERE extname = 'citus'",
            &[],
        )
        .await?
        .get(0);
    Ok(n > 0)
}

/// On a Citus coordinator, distributes the device tables by `device_id`,
/// co-located ([`DISTRIBUTED`]), in `shard_count` shards (0: Citus's
/// `citus.shard_count`); tables without a device (`dead_letters`,
/// `applied_batches`, `gateway_meta`) stay local to the coordinator, which
/// is registered in the cluster so that they join the same distributed
/// transactions. Partitions of `readings` created later on the coordinator
/// are distributed by Citus itself. Idempotent; returns the tables it
/// distributed now. On plain PostgreSQL it does nothing.
///
/// # Errors
/// Any database error.
pub async fn distribute(
    client: &Client,
    schema: &str,
    shard_count: u32,
) -> Result<Vec<String>, tokio_postgres::Error> {
    if !is_citus(client).await? {
        return Ok(Vec::new());
    }
    client
        .execute("SELECT pg_advisory_lock($1)", &[&DDL_LOCK])
        .await?;
    let result = async {
        let mut done = Vec::new();
        for table in DISTRIBUTED {
            let qualified = format!("{schema}.{table}");
            let present: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid = $1::text::regclass",
                    &[&qualified],
                )
                .await?
                .get(0);
            if present > 0 {
                continue;
            }
            if table == "readings" {
                let shards = i32::try_from(shard_count).unwrap_or(i32::MAX);
                client
                    .execute(
                        "SELECT create_distributed_table($1::text::regclass, 'device_id', \
                         shard_count => CASE WHEN $2::int4 > 0 THEN $2::int4 \
                         ELSE current_setting('citus.shard_count')::int4 END)",
                        &[&qualified, &shards],
                    )
                    .await?;
            } else {
                client
                    .execute(
                        "SELECT create_distributed_table($1::text::regclass, 'device_id', colocate_with => $2)",
                        &[&qualified, &format!("{schema}.readings")],
                    )
                    .await?;
            }
            done.push(qualified);
        }
        Ok(done)
    }
    .await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&DDL_LOCK])
        .await?;
    result
}

/// What identifies the database a spool belongs to: the cluster's system
/// identifier (when this role may read it), the database name, and the
/// schema's random instance id.
///
/// # Errors
/// Any database error.
pub async fn identity(client: &Client, schema: &str) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT current_database(), \
                 (SELECT value FROM {schema}.gateway_meta WHERE key = 'instance_id')"
            ),
            &[],
        )
        .await?;
    let system = match client
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
    {
        Ok(row) => row.get::<_, String>(0),
        Err(_) => "-".to_string(),
    };
    Ok(format!(
        "system={system} database={} instance={}",
        row.get::<_, String>(0),
        row.get::<_, Option<String>>(1).unwrap_or_default()
    ))
}
