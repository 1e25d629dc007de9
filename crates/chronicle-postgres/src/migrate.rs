//! Versioned schema migrations, applied once and recorded.
//!
//! Every migration runs inside one transaction that first takes a
//! transaction-level advisory lock, so two processes migrating at once
//! serialize (and the second finds nothing left to do), and nothing relies on
//! session state (safe behind PgBouncer in transaction mode).

use checksum::checksum;
use tokio_postgres::GenericClient;
use tokio_postgres::types::Type;

use crate::{Error, PgPool, Result};

/// The advisory lock key that serializes migrations (`"chronicle"` in hex).
const MIGRATION_LOCK: i64 = 0x6368_726f_6e69_636c;

/// One schema migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Its version; applied in ascending order.
    pub version: i32,
    /// A short name.
    pub name: &'static str,
    /// The SQL, possibly with `{{…}}` placeholders filled from
    /// [`MigrateOptions`].
    pub sql: &'static str,
}

/// Every migration this binary knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events",
        sql: include_str!("../migrations/0001_events.sql"),
    },
    Migration {
        version: 2,
        name: "append",
        sql: include_str!("../migrations/0002_append.sql"),
    },
    Migration {
        version: 3,
        name: "crypto",
        sql: include_str!("../migrations/0003_crypto.sql"),
    },
    Migration {
        version: 4,
        name: "projections",
        sql: include_str!("../migrations/0004_projections.sql"),
    },
    Migration {
        version: 5,
        name: "upcast",
        sql: include_str!("../migrations/0005_upcast.sql"),
    },
    Migration {
        version: 6,
        name: "lean_append",
        sql: include_str!("../migrations/0006_lean_append.sql"),
    },
    Migration {
        version: 7,
        name: "upcast_lease",
        sql: include_str!("../migrations/0007_upcast_lease.sql"),
    },
    Migration {
        version: 8,
        name: "notify",
        sql: include_str!("../migrations/0008_notify.sql"),
    },
    Migration {
        version: 9,
        name: "audit_chains",
        sql: include_str!("../migrations/0009_audit_chains.sql"),
    },
    Migration {
        version: 10,
        name: "append_fast_path",
        sql: include_str!("../migrations/0010_append_fast_path.sql"),
    },
    Migration {
        version: 11,
        name: "audit_sealed_after_commit",
        sql: include_str!("../migrations/0011_audit_sealed_after_commit.sql"),
    },
    Migration {
        version: 12,
        name: "audit_encrypt_records_derived",
        sql: include_str!("../migrations/0012_audit_encrypt_records_derived.sql"),
    },
    Migration {
        version: 13,
        name: "projection_subscriptions",
        sql: include_str!("../migrations/0013_projection_subscriptions.sql"),
    },
    Migration {
        version: 14,
        name: "snapshots",
        sql: include_str!("../migrations/0014_snapshots.sql"),
    },
    Migration {
        version: 15,
        name: "combined_append",
        sql: include_str!("../migrations/0015_combined_append.sql"),
    },
];

/// The newest schema version this binary knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Options for [`migrate`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrateOptions {
    /// Hash-partition `events` by `aggregate_id` into this many partitions
    /// (`None`: one plain table). Only takes effect when the table is
    /// created; asking for another layout later is an error.
    pub partitions: Option<u16>,
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    /// The versions applied by this call, in order (empty: up to date).
    pub applied: Vec<i32>,
    /// The schema version after the call.
    pub version: i32,
}

/// Applies every migration not yet recorded, in one transaction.
///
/// Refuses to touch a database whose schema is newer than this binary knows,
/// and a database whose recorded migration differs from this binary's copy.
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool) -> chronicle_postgres::Result<()> {
/// use chronicle_postgres::{migrate, MigrateOptions};
///
/// let report = migrate(&pool, MigrateOptions::default()).await?;
/// println!("schema at version {}", report.version);
/// # Ok(()) }
/// ```
pub async fn migrate(pool: &PgPool, options: MigrateOptions) -> Result<MigrateReport> {
    if options.partitions == Some(0) || options.partitions.is_some_and(|n| n > 1024) {
        return Err(Error::Config(
            "--partitions must be between 1 and 1024".to_owned(),
        ));
    }
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute_typed(
        "SELECT pg_advisory_xact_lock($1)",
        &[(&MIGRATION_LOCK, Type::INT8)],
    )
    .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS chronicle_schema_migrations (
             version INTEGER PRIMARY KEY,
             name TEXT NOT NULL,
             checksum TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let recorded = tx
        .query_typed(
            "SELECT version, checksum FROM chronicle_schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    let database_version = recorded
        .iter()
        .map(|r| r.get::<_, i32>(0))
        .max()
        .unwrap_or(0);
    if database_version > latest_version() {
        return Err(Error::SchemaTooNew {
            database: database_version,
            binary: latest_version(),
        });
    }
    for row in &recorded {
        let (version, sum): (i32, String) = (row.get(0), row.get(1));
        if let Some(m) = MIGRATIONS.iter().find(|m| m.version == version)
            && checksum(m.sql) != sum
        {
            return Err(Error::MigrationChanged {
                version,
                name: m.name,
            });
        }
    }
    if database_version >= 1 {
        check_partitioning(&*tx, options.partitions).await?;
    }
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > database_version) {
        let sql = render(m.sql, options);
        tx.batch_execute(&sql)
            .await
            .map_err(|source| Error::Migration {
                version: m.version,
                name: m.name,
                source,
            })?;
        tx.execute_typed(
            "INSERT INTO chronicle_schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
            &[
                (&m.version, Type::INT4),
                (&m.name, Type::TEXT),
                (&checksum(m.sql), Type::TEXT),
            ],
        )
        .await?;
        applied.push(m.version);
    }
    tx.commit().await?;
    Ok(MigrateReport {
        applied,
        version: latest_version().max(database_version),
    })
}

/// The schema version recorded in the database (0: never migrated).
pub async fn schema_version(client: &impl GenericClient) -> Result<i32> {
    let row = client
        .query_typed_one(
            "SELECT CASE WHEN to_regclass('chronicle_schema_migrations') IS NULL THEN 0
                    ELSE (SELECT coalesce(max(version), 0) FROM chronicle_schema_migrations) END",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Fails when the binary's schema is not the one recorded in the database:
/// newer (upgrade the binary) or older (run `chronicle migrate`).
pub async fn ensure_schema(client: &impl GenericClient) -> Result<()> {
    let version = schema_version(client).await?;
    match version.cmp(&latest_version()) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(Error::SchemaTooNew {
            database: version,
            binary: latest_version(),
        }),
        std::cmp::Ordering::Less => Err(Error::SchemaTooOld {
            database: version,
            binary: latest_version(),
        }),
    }
}

async fn check_partitioning(tx: &impl GenericClient, wanted: Option<u16>) -> Result<()> {
    let Some(wanted) = wanted else {
        return Ok(());
    };
    let row = tx
        .query_typed_one(
            "SELECT (SELECT partnatts FROM pg_partitioned_table WHERE partrelid = 'events'::regclass) IS NOT NULL,
                    (SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass)",
            &[],
        )
        .await?;
    let (partitioned, count): (bool, i64) = (row.get(0), row.get(1));
    if !partitioned || count != i64::from(wanted) {
        let now = if partitioned {
            format!("{count} hash partitions")
        } else {
            "one plain table".to_owned()
        };
        return Err(Error::Config(format!(
            "events already exists as {now}; --partitions only applies when the table is created. \
             Re-partitioning means copying the table into a new one (see docs/architecture.md)"
        )));
    }
    Ok(())
}

fn render(sql: &str, options: MigrateOptions) -> String {
    let (pk, clause, partitions) = match options.partitions {
        None => ("PRIMARY KEY (event_id)".to_owned(), String::new(), String::new()),
        Some(n) => (
            "PRIMARY KEY (event_id, aggregate_id)".to_owned(),
            "PARTITION BY HASH (aggregate_id)".to_owned(),
            (0..n)
                .map(|i| {
                    format!(
                        "CREATE TABLE events_p{i} PARTITION OF events FOR VALUES WITH (MODULUS {n}, REMAINDER {i});\n"
                    )
                })
                .collect(),
        ),
    };
    sql.replace("{{PRIMARY_KEY}}", &pk)
        .replace("{{PARTITION_CLAUSE}}", &clause)
        .replace("{{PARTITIONS}}", &partitions)
}

/// A small, dependency-free content checksum for recorded migrations
/// (FNV-1a, 64 bit): it detects an edited migration, not an attacker.
mod checksum {
    pub fn checksum(text: &str) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in text.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("fnv1a64:{hash:016x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_ascend_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1, "migration {} out of order", m.name);
        }
    }

    #[test]
    fn render_partitioned_makes_n_partitions() {
        let sql = render(
            MIGRATIONS[0].sql,
            MigrateOptions {
                partitions: Some(4),
            },
        );
        assert_eq!(sql.matches("PARTITION OF events").count(), 4);
        assert!(sql.contains("PRIMARY KEY (event_id, aggregate_id)"));
        let plain = render(MIGRATIONS[0].sql, MigrateOptions::default());
        assert!(plain.contains("PRIMARY KEY (event_id)"));
        assert!(!plain.contains("{{"));
    }
}
