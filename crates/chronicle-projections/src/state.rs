//! Reading `projection_state`.

use std::collections::HashMap;
use std::time::Duration;

use chronicle_core::{HealthStatus, Position, ProjectionState, ProjectionStatus};
use chronicle_postgres::PgPool;
use chronicle_step::LagProbe;
use tokio_postgres::types::Type;

use crate::sql::Xid8;
use crate::{Error, Result};

/// The state of every partition of `projection` (`None`: of every
/// projection), ordered by projection and partition.
///
/// The lag is measured now, against the head of the feed (only the
/// subscribed events, with the step's own statement,
/// [`chronicle_step::LagProbe`]), not as of the partition's last step: a
/// partition nobody steps shows the events waiting behind it. A running or
/// rebuilding partition with no live lease is
/// [`ProjectionState::stalled`] when its last owner's lease expired or
/// events wait.
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
                    heartbeat, lease_expires_at, updated_at, subscription,
                    owner IS NOT NULL AND lease_expires_at > now(),
                    owner IS NOT NULL AND lease_expires_at <= now()
               FROM projection_state
              WHERE $1::text IS NULL OR projection = $1
              ORDER BY projection, partition",
            &[(&projection, Type::TEXT)],
        )
        .await?;
    let mut probes: HashMap<String, LagProbe> = HashMap::new();
    let mut states = Vec::with_capacity(rows.len());
    for r in &rows {
        let projection: String = r.get(0);
        let subscription = chronicle_step::read_stored_subscription(&projection, r.get(15))?;
        let partitions = r.get::<_, i32>(2) as u32;
        let checkpoint = Position::new(r.get::<_, Xid8>(3).0, r.get(4));
        let partition = r.get::<_, i32>(1) as u32;
        let probe = probes
            .entry(projection.clone())
            .or_insert_with(|| LagProbe::new(subscription.clone(), partitions));
        let lag = probe.measure(&client, partition, checkpoint).await?;
        let status = ProjectionStatus::parse(r.get(5)).unwrap_or(ProjectionStatus::Failed);
        let (leased, expired): (bool, bool) = (r.get(16), r.get(17));
        let active = matches!(
            status,
            ProjectionStatus::Running | ProjectionStatus::Rebuilding
        );
        states.push(ProjectionState {
            subscription,
            projection,
            partition,
            partitions,
            checkpoint,
            status,
            lag_events: lag.events,
            lag_seconds: lag.seconds,
            events_processed: r.get::<_, i64>(8) as u64,
            last_error: r.get(9),
            failure_count: r.get::<_, i64>(10) as u64,
            owner: r.get(11),
            heartbeat: r.get(12),
            lease_expires_at: r.get(13),
            updated_at: r.get(14),
            stalled: active && !leased && (expired || lag.events > 0),
        });
    }
    Ok(states)
}

/// The health of `projection` from `projection_state` and the dead-letter
/// queue, wherever it runs, with the lag measured now ([`load`]): healthy
/// when every partition is running or rebuilding, none is stalled and none
/// is `lag_alert_after` or more behind.
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
        && partitions.iter().all(|p| !p.stalled)
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
