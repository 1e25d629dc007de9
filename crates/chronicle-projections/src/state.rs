//! Reading `projection_state`.

use std::time::Duration;

use chronicle_core::{HealthStatus, Position, ProjectionState, ProjectionStatus};
use chronicle_postgres::PgPool;
use tokio_postgres::types::Type;

use crate::sql::Xid8;
use crate::{Error, Result};

/// The state of every partition of `projection` (`None`: of every
/// projection), ordered by projection and partition.
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool) -> chronicle_projections::Result<()> {
/// for p in chronicle_projections::load_state(&pool, None).await? {
///     println!("{} #{}: {} at {}, {} events behind", p.projection, p.partition, p.status, p.checkpoint, p.lag_events);
/// }
/// # Ok(()) }
/// ```
pub async fn load(pool: &PgPool, projection: Option<&str>) -> Result<Vec<ProjectionState>> {
    let client = pool.get().await?;
    let rows = client
        .query_typed(
            "SELECT projection, partition, partitions, checkpoint_xid, checkpoint_position, status,
                    lag_events, lag_seconds, events_processed, last_error, failure_count, owner,
                    heartbeat, lease_expires_at, updated_at, subscription
               FROM projection_state
              WHERE $1::text IS NULL OR projection = $1
              ORDER BY projection, partition",
            &[(&projection, Type::TEXT)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let projection: String = r.get(0);
            Ok(ProjectionState {
                subscription: chronicle_step::read_stored_subscription(&projection, r.get(15))?,
                projection,
                partition: r.get::<_, i32>(1) as u32,
                partitions: r.get::<_, i32>(2) as u32,
                checkpoint: Position::new(r.get::<_, Xid8>(3).0, r.get(4)),
                status: ProjectionStatus::parse(r.get(5)).unwrap_or(ProjectionStatus::Failed),
                lag_events: r.get::<_, i64>(6) as u64,
                lag_seconds: r.get(7),
                events_processed: r.get::<_, i64>(8) as u64,
                last_error: r.get(9),
                failure_count: r.get::<_, i64>(10) as u64,
                owner: r.get(11),
                heartbeat: r.get(12),
                lease_expires_at: r.get(13),
                updated_at: r.get(14),
            })
        })
        .collect()
}

/// The health of `projection` from `projection_state` and the dead-letter
/// queue, wherever it runs: healthy when every partition is running or
/// rebuilding and none is `lag_alert_after` or more behind.
///
/// ```no_run
/// # async fn demo(pool: chronicle_postgres::PgPool) -> chronicle_projections::Result<()> {
/// use std::time::Duration;
///
/// let health = chronicle_projections::health(&pool, "user-profile", Duration::from_secs(60)).await?;
/// println!("{} events behind, {} dead letters", health.lag_events, health.dead_letters);
/// # Ok(()) }
/// ```
pub async fn health(
    pool: &PgPool,
    projection: &str,
    lag_alert_after: Duration,
) -> Result<HealthStatus> {
    let partitions = load(pool, Some(projection)).await?;
    if partitions.is_empty() {
        return Err(Error::NotRegistered(projection.to_owned()));
    }
    let dead_letters = crate::dlq::count(pool, projection).await?;
    let threshold = lag_alert_after.as_secs_f64();
    let lag_events = partitions.iter().map(|p| p.lag_events).max().unwrap_or(0);
    let lag_seconds = partitions.iter().map(|p| p.lag_seconds).fold(0.0, f64::max);
    let healthy = lag_seconds < threshold
        && partitions.iter().all(|p| {
            matches!(
                p.status,
                ProjectionStatus::Running | ProjectionStatus::Rebuilding
            )
        });
    Ok(HealthStatus {
        projection: projection.to_owned(),
        healthy,
        lag_events,
        lag_seconds,
        dead_letters,
        partitions,
        provider: None,
    })
}
