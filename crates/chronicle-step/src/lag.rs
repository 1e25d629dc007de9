//! [`LagProbe`]: a partition's lag measured now, against the head of the
//! feed, with the statement the step measures it with.

use chronicle_core::{Position, Subscription};
use chronicle_sql::Xid8;
use tokio_postgres::types::{ToSql, Type};

use crate::Result;
use crate::feed::Feed;
use crate::step::LAG_COUNT_CAP;

/// A partition's lag as of now: what waits after its checkpoint in the
/// feed (only the subscribed events), whoever holds it and whenever it
/// last stepped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    /// Events of the partition after its checkpoint, counted among the
    /// next [`LAG_COUNT_CAP`] events of the (subscribed) feed, so a longer
    /// backlog reads as that lower bound.
    pub events: u64,
    /// The age in seconds of the partition's oldest pending event (0: none).
    pub seconds: f64,
}

/// Measures a projection's lag at the time of asking, with the subqueries
/// of the step's own checkpoint statement (the same indexes, the same
/// subscription, the same cap), so status, health and metrics report what
/// is waiting even when no worker steps the partition.
///
/// ```no_run
/// # async fn demo(client: &tokio_postgres::Client) -> chronicle_step::Result<()> {
/// use chronicle_core::{Position, Subscription};
/// use chronicle_step::LagProbe;
///
/// let probe = LagProbe::new(Subscription::all(), 4);
/// let lag = probe.measure(client, 0, Position::new(0, 0)).await?;
/// println!("{} events, {:.1} s behind", lag.events, lag.seconds);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LagProbe {
    feed: Feed,
    partitions: u32,
}

impl LagProbe {
    /// The probe of a projection with `partitions` partitions that takes
    /// `subscription`.
    pub fn new(subscription: Subscription, partitions: u32) -> Self {
        LagProbe {
            feed: Feed::new(subscription, partitions),
            partitions: partitions.max(1),
        }
    }

    /// The lag of `partition` whose checkpoint is `checkpoint`, now. One
    /// statement, sent unnamed (it works behind any pooler).
    pub async fn measure(
        &self,
        client: &tokio_postgres::Client,
        partition: u32,
        checkpoint: Position,
    ) -> Result<Lag> {
        let p = partition as i32;
        let n = self.partitions as i32;
        let xid = Xid8(checkpoint.transaction_id);
        // The checkpoint statement's numbering: the parameters it does not
        // read are bound to placeholders of their types.
        let (unused_text, unused_bool, unused_int, unused_float) = ("", false, 0i64, 0f64);
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
            (&unused_text, Type::TEXT),
            (&p, Type::INT4),
            (&xid, Type::XID8),
            (&checkpoint.global_position, Type::INT8),
            (&unused_bool, Type::BOOL),
            (&unused_int, Type::INT8),
            (&unused_int, Type::INT8),
            (&unused_text, Type::TEXT),
            (&unused_bool, Type::BOOL),
            (&unused_float, Type::FLOAT8),
            (&n, Type::INT4),
            (&LAG_COUNT_CAP, Type::INT8),
        ];
        params.extend(self.feed.type_params());
        let row = client.query_typed(self.feed.lag_sql(), &params).await?;
        let row = row.first().expect("a SELECT without FROM returns one row");
        Ok(Lag {
            events: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
            seconds: row.get(1),
        })
    }
}
