//! How a step reads the feed for its subscription: the window statement
//! and the checkpoint statement that measures lag, built once per
//! projection.
//!
//! A projection that takes every event reads a window of the feed index
//! `(transaction_id, global_position)`. A subscription reads the events
//! it takes through the index on `(event_type, transaction_id,
//! global_position)` or `(aggregate_type, transaction_id,
//! global_position)` (migration 13), one ordered index scan per listed
//! type merged in feed order, so a projection of one type among many
//! reads its share of the store and nothing else. Its window is a window
//! of the *subscribed* feed: the checkpoint moves to the window's last
//! subscribed event, or to the horizon when the window is not full, and
//! the unrelated events in between are passed without being read.

use chronicle_core::Subscription;
use tokio_postgres::types::{ToSql, Type};

use crate::{Error, Result};

/// The `kind` column of a window row, and its values.
pub(crate) const WINDOW_KIND: usize = 11;
/// A row of the partition: an event to handle.
pub(crate) const EVENT: i32 = 0;
/// The window's first row: the window is not empty.
pub(crate) const FIRST: i32 = 1;
/// The window's last row, when it is full: where the next step starts.
pub(crate) const LAST: i32 = 2;

/// A step's window of the feed with one partition and every event: every
/// row is the partition's event (`kind` [`EVENT`]).
const WINDOW_WHOLE: &str = "\
SELECT event_id, aggregate_id, aggregate_type, event_type, event_data, metadata, version, timestamp,
       encrypted_fields, transaction_id, global_position, 0 AS kind,
       aggregate_id IN (SELECT d.aggregate_id FROM projection_dead_letters d WHERE d.projection = $7)
  FROM events
 WHERE (transaction_id, global_position) > ($1, $2) AND transaction_id < $3
 ORDER BY transaction_id, global_position
 LIMIT $6";

/// A step's window of the feed with several partitions and every event:
/// the partition's events among the window's `$6` rows ([`EVENT`]), then
/// the window's first row ([`FIRST`], if it has any) and its last when it
/// is full ([`LAST`]), read from the index alone. Other partitions' rows
/// are not sent.
const WINDOW_PARTITION: &str = "\
(SELECT event_id, aggregate_id, aggregate_type, event_type, event_data, metadata, version, timestamp,
        encrypted_fields, transaction_id, global_position, 0 AS kind,
        aggregate_id IN (SELECT d.aggregate_id FROM projection_dead_letters d WHERE d.projection = $7)
   FROM (SELECT event_id, aggregate_id, aggregate_type, event_type, event_data, metadata, version,
                timestamp, encrypted_fields, transaction_id, global_position
           FROM events
          WHERE (transaction_id, global_position) > ($1, $2) AND transaction_id < $3
          ORDER BY transaction_id, global_position
          LIMIT $6) AS w
  WHERE chronicle_partition(aggregate_id, $4) = $5
  ORDER BY transaction_id, global_position)
UNION ALL
(SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, transaction_id, global_position, 1, FALSE
   FROM events
  WHERE (transaction_id, global_position) > ($1, $2) AND transaction_id < $3
  ORDER BY transaction_id, global_position
  LIMIT 1)
UNION ALL
(SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, transaction_id, global_position, 2, FALSE
   FROM events
  WHERE (transaction_id, global_position) > ($1, $2) AND transaction_id < $3
  ORDER BY transaction_id, global_position
  OFFSET $6 - 1 LIMIT 1)";

/// The checkpoint's update: the checkpoint, lag, counters and lease of a
/// partition in one statement, the lag figures as subqueries (the count's
/// only runs when `$5` asks for it). `{COUNT_MINE}` counts the partition's
/// backlog, `{COUNT_ALL}` every partition's, `{OLDEST}` is the age of the
/// partition's oldest pending event.
const FINISH: &str = "\
UPDATE projection_state
   SET checkpoint_xid = $3, checkpoint_position = $4,
       lag_events = CASE WHEN NOT $5 THEN lag_events
                         WHEN $9 AND $11 > 1 THEN ({COUNT_MINE})
                         ELSE ({COUNT_ALL}) / $11 END,
       lag_seconds = coalesce(({OLDEST}), 0),
       lag_counted_at = CASE WHEN $5 THEN clock_timestamp() ELSE lag_counted_at END,
       events_processed = events_processed + $6,
       failure_count = failure_count + $7,
       last_error = coalesce($8, last_error),
       status = CASE WHEN status = 'rebuilding' AND $9 THEN 'running' ELSE status END,
       heartbeat = clock_timestamp(),
       lease_expires_at = clock_timestamp() + make_interval(secs => $10),
       updated_at = clock_timestamp()
 WHERE projection = $1 AND partition = $2
RETURNING lag_events, lag_seconds";

/// A partition's lag now, with the checkpoint statement's own subqueries
/// and parameter numbers: the backlog among the next `$12` events (the
/// partition's own when there are several, `$11 > 1`) and the age of its
/// oldest pending event. `$1` and `$5`..`$10` are not read.
const LAG: &str = "\
SELECT CASE WHEN $11 > 1 THEN ({COUNT_MINE}) ELSE ({COUNT_ALL}) END,
       coalesce(({OLDEST}), 0)";

/// Every event: the backlog among the next `$12` rows of the feed; the
/// share of all partitions is counted from the feed index alone.
const COUNT_MINE_ALL: &str = "\
SELECT count(*) FILTER (WHERE chronicle_partition(aggregate_id, $11) = $2)
  FROM (SELECT aggregate_id FROM events
         WHERE (transaction_id, global_position) > ($3, $4)
         ORDER BY transaction_id, global_position
         LIMIT $12) AS backlog";
const COUNT_ALL_ALL: &str = "\
SELECT count(*)
  FROM (SELECT FROM events
         WHERE (transaction_id, global_position) > ($3, $4)
         ORDER BY transaction_id, global_position
         LIMIT $12) AS backlog";
const OLDEST_ALL: &str = "\
SELECT greatest(extract(epoch FROM clock_timestamp() - timestamp), 0)::float8
  FROM (SELECT aggregate_id, timestamp FROM events
         WHERE (transaction_id, global_position) > ($3, $4)
         ORDER BY transaction_id, global_position
         LIMIT $12) AS backlog
 WHERE chronicle_partition(aggregate_id, $11) = $2
 LIMIT 1";

/// A projection's subscription, as its step's statements take it.
#[derive(Debug)]
pub(crate) struct Feed {
    subscription: Subscription,
    /// The types of the indexed column: one (bound as `text`) or several
    /// (bound as `text[]`); `None`: every event.
    indexed: Option<Types>,
    /// The types of the other column (`None`: any).
    other: Option<Vec<String>>,
    /// As `projection_state.subscription` stores it (`NULL`: every event).
    stored: Option<serde_json::Value>,
    window: String,
    finish: String,
    lag: String,
}

/// How a step checks that each aggregate's events come in version order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OrderCheck {
    /// Every event: versions follow each other; the predecessor of an
    /// aggregate's first event in a batch is looked up.
    Consecutive,
    /// A subscription by aggregate type: as `Consecutive`, and a skipped
    /// version (an aggregate whose type changed) is looked up too.
    Gaps,
    /// A subscription by event type: versions skip as a rule, and the
    /// window statement says of every event whether its predecessor lies
    /// after it (the column after the dead-letter flag).
    Probed,
}

/// The types of the indexed column.
#[derive(Debug)]
enum Types {
    One(String),
    Many(Vec<String>),
}

/// How a subscription reads an index: the indexed type column, and the
/// other column when its types are listed too.
struct Index {
    column: &'static str,
    other: Option<&'static str>,
}

/// Where a scan starts and what it binds: SQL expressions, mostly
/// parameters.
#[derive(Clone, Copy)]
struct Bounds<'a> {
    /// The type: one type's parameter, `t.name` inside a merge; for
    /// [`Index::merged`], the parameter of the type or types.
    name: &'a str,
    /// The position the scan starts after: `xid, position`.
    after: &'a str,
    /// The feed's horizon, if the scan stops below it.
    horizon: Option<&'a str>,
    /// The other column's types (a `text[]`).
    other: &'a str,
}

impl Index {
    /// `SELECT columns` of the subscribed events of type `b.name` after
    /// `(b.after)` (and below `b.horizon`) in feed order, an index scan of
    /// `(column, transaction_id, global_position)` that starts at the
    /// checkpoint.
    ///
    /// The type and the range are two three-column row comparisons,
    /// `(column, transaction_id, global_position) > (name, after)` and
    /// `< (name, horizon, 0)`, which together say `column = name` between
    /// the checkpoint and the horizon and are the scan's start and end in
    /// the B-tree. Written with `column = name`, the B-tree starts at the
    /// type's first entry and reads every entry up to the checkpoint on
    /// every step (PostgreSQL positions on the equality and only filters by
    /// a row comparison); with `column <= name`, plans made for the actual
    /// values do the same; with `(transaction_id, global_position) > ...`
    /// alone, the planner prefers the feed index and filters the whole
    /// feed.
    fn scan(&self, columns: &str, b: Bounds<'_>) -> String {
        let Bounds {
            name,
            after,
            horizon,
            other,
        } = b;
        let column = self.column;
        // No horizon: the largest transaction id there can be.
        let below = horizon.unwrap_or("'18446744073709551615'::xid8");
        let mut sql = format!(
            "SELECT {columns} FROM events
              WHERE ({column}, transaction_id, global_position) > ({name}, {after})
                AND ({column}, transaction_id, global_position) < ({name}, {below}, 0)"
        );
        if let Some(other_column) = self.other {
            sql.push_str(&format!(" AND {other_column} = ANY({other})"));
        }
        sql.push_str(&format!(
            "\n              ORDER BY {column}, transaction_id, global_position"
        ));
        sql
    }

    /// The first `limit` subscribed events (`columns` of them, which must
    /// include the position) after `b.after`, every listed type merged in
    /// feed order: one ordered scan per type. `b.name` is the parameter
    /// holding the types: a `text` for one type, a `text[]` for several
    /// (`many`).
    fn merged(&self, many: bool, columns: &str, b: Bounds<'_>, limit: &str) -> String {
        if !many {
            return format!("{} LIMIT {limit}", self.scan(columns, b));
        }
        format!(
            "SELECT e.* FROM unnest({}::text[]) AS t(name)
              CROSS JOIN LATERAL ({} LIMIT {limit}) AS e
              ORDER BY e.transaction_id, e.global_position LIMIT {limit}",
            b.name,
            self.scan(
                columns,
                Bounds {
                    name: "t.name",
                    ..b
                }
            )
        )
    }
}

/// The event columns a window returns, in the order `decode_event` reads.
const EVENT_COLUMNS: &str = "event_id, aggregate_id, aggregate_type, event_type, event_data, \
     metadata, version, timestamp, encrypted_fields, transaction_id, global_position";
/// A window row that only marks a position (`kind` FIRST or LAST).
const MARK: &str =
    "NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, transaction_id, global_position";
/// Whether the row's predecessor (its aggregate's previous version) lies
/// after it in the feed: an order violation. One probe of the
/// `(aggregate_id, version)` index per row, for subscriptions by event type,
/// whose aggregates' versions skip as a rule.
const PREDECESSOR_AHEAD: &str = "w.version > 1 AND EXISTS (SELECT FROM events p \
     WHERE p.aggregate_id = w.aggregate_id AND p.version = w.version - 1 \
       AND (p.transaction_id, p.global_position) > (w.transaction_id, w.global_position))";
const IN_DEAD_LETTERS: &str = "aggregate_id IN (SELECT d.aggregate_id FROM projection_dead_letters d \
     WHERE d.projection = $7)";

impl Feed {
    /// The statements of a projection with `partitions` partitions taking
    /// `subscription`.
    pub(crate) fn new(subscription: Subscription, partitions: u32) -> Self {
        let list = |l: &[String]| (!l.is_empty()).then(|| l.to_vec());
        let events = list(subscription.event_types());
        let aggregates = list(subscription.aggregate_types());
        // Event types are the narrower condition as a rule: read through
        // their index and check the aggregate type on the rows found.
        let (indexed, other, index) = match (events, aggregates) {
            (Some(events), aggregates) => {
                let index = Index {
                    column: "event_type",
                    other: aggregates.is_some().then_some("aggregate_type"),
                };
                (Some(events), aggregates, Some(index))
            }
            (None, Some(aggregates)) => {
                let index = Index {
                    column: "aggregate_type",
                    other: None,
                };
                (Some(aggregates), None, Some(index))
            }
            (None, None) => (None, None, None),
        };
        let (window, [finish, lag]) = match &index {
            Some(index) => {
                let many = indexed.as_ref().is_some_and(|t| t.len() > 1);
                (
                    Self::window_subscribed(index, many),
                    Self::finish_subscribed(index, many),
                )
            }
            None => {
                let window = if partitions == 1 {
                    WINDOW_WHOLE
                } else {
                    WINDOW_PARTITION
                };
                let statements = [FINISH, LAG].map(|sql| {
                    sql.replace("{COUNT_MINE}", COUNT_MINE_ALL)
                        .replace("{COUNT_ALL}", COUNT_ALL_ALL)
                        .replace("{OLDEST}", OLDEST_ALL)
                });
                (window.to_owned(), statements)
            }
        };
        Feed {
            stored: (!subscription.is_all()).then(|| {
                serde_json::to_value(&subscription).expect("a subscription serializes to JSON")
            }),
            subscription,
            indexed: indexed.map(|mut types| {
                if types.len() == 1 {
                    Types::One(types.remove(0))
                } else {
                    Types::Many(types)
                }
            }),
            other,
            window,
            finish,
            lag,
        }
    }

    /// A window of the subscribed feed: the partition's events among the
    /// first `$6` subscribed events after the checkpoint ([`EVENT`]), the
    /// window's first ([`FIRST`]) and, when it is full, last ([`LAST`])
    /// position. `$8`: the indexed column's types, `$9`: the other's.
    fn window_subscribed(index: &Index, many: bool) -> String {
        let column = index.column;
        let (probe, no_probe) = if column == "event_type" {
            (format!(", {PREDECESSOR_AHEAD}"), ", FALSE")
        } else {
            (String::new(), "")
        };
        let window = Bounds {
            name: "$8",
            after: "$1, $2",
            horizon: Some("$3"),
            other: "$9",
        };
        let merged = |columns: &str, limit: &str| index.merged(many, columns, window, limit);
        let positions = "transaction_id, global_position";
        let (first, last) = if many {
            // Several types: the merged window once, its ends from it.
            let window = merged(EVENT_COLUMNS, "$6");
            return format!(
                "WITH w AS MATERIALIZED ({window})
                 (SELECT {EVENT_COLUMNS}, 0 AS kind, {IN_DEAD_LETTERS}{probe} FROM w
                   WHERE $4 = 1 OR chronicle_partition(aggregate_id, $4) = $5
                   ORDER BY transaction_id, global_position)
                 UNION ALL
                 (SELECT {MARK}, 1, FALSE{no_probe} FROM w
                   ORDER BY transaction_id, global_position LIMIT 1)
                 UNION ALL
                 (SELECT {MARK}, 2, FALSE{no_probe} FROM w ORDER BY transaction_id, global_position
                  OFFSET $6 - 1 LIMIT 1)"
            );
        } else {
            // One type: every part an ordered scan of its index.
            (
                merged(positions, "1"),
                format!("{} OFFSET $6 - 1 LIMIT 1", index.scan(positions, window)),
            )
        };
        format!(
            "(SELECT {EVENT_COLUMNS}, 0 AS kind, {IN_DEAD_LETTERS}{probe}
                FROM ({}) AS w
               WHERE $4 = 1 OR chronicle_partition(aggregate_id, $4) = $5
               ORDER BY {column}, transaction_id, global_position)
             UNION ALL
             (SELECT {MARK}, 1, FALSE{no_probe} FROM ({first}) AS f)
             UNION ALL
             (SELECT {MARK}, 2, FALSE{no_probe} FROM ({last}) AS l)",
            merged(EVENT_COLUMNS, "$6")
        )
    }

    /// The checkpoint statement of a subscription: its lag among the next
    /// `$12` subscribed events of each listed type (`$13`, the other
    /// column's types `$14`).
    fn finish_subscribed(index: &Index, many: bool) -> [String; 2] {
        let at = |name: &'static str| Bounds {
            name,
            after: "$3, $4",
            horizon: None,
            other: "$14",
        };
        let backlog = |columns: &str| {
            let scan = index.scan(columns, at(if many { "t.name" } else { "$13" }));
            if many {
                // A count needs no merge: each type's share, bounded.
                format!(
                    "unnest($13::text[]) AS t(name) CROSS JOIN LATERAL ({scan} LIMIT $12) AS backlog"
                )
            } else {
                format!("({scan} LIMIT $12) AS backlog")
            }
        };
        let count_mine = format!(
            "SELECT count(*) FILTER (WHERE chronicle_partition(backlog.aggregate_id, $11) = $2)
               FROM {}",
            backlog("aggregate_id")
        );
        let count_all = format!("SELECT count(*) FROM {}", backlog("aggregate_id"));
        // The partition's oldest pending event: each type's first in the
        // partition among its next `$12`, the oldest of those.
        // (In the scan's own order: one that says `column` first lets the
        // plan stop at the first row instead of sorting the whole backlog.)
        let column = index.column;
        let mine = |name: &'static str| {
            format!(
                "SELECT b.timestamp, b.transaction_id, b.global_position
                   FROM ({} LIMIT $12) AS b
                  WHERE chronicle_partition(b.aggregate_id, $11) = $2
                  ORDER BY b.{column}, b.transaction_id, b.global_position LIMIT 1",
                index.scan(
                    &format!("aggregate_id, timestamp, transaction_id, global_position, {column}"),
                    at(name)
                )
            )
        };
        let oldest_from = if many {
            format!(
                "unnest($13::text[]) AS t(name) CROSS JOIN LATERAL ({}) AS o",
                mine("t.name")
            )
        } else {
            format!("({}) AS o", mine("$13"))
        };
        let oldest = format!(
            "SELECT greatest(extract(epoch FROM clock_timestamp() - o.timestamp), 0)::float8
               FROM {oldest_from}
              ORDER BY o.transaction_id, o.global_position LIMIT 1"
        );
        [FINISH, LAG].map(|sql| {
            sql.replace("{COUNT_MINE}", &count_mine)
                .replace("{COUNT_ALL}", &count_all)
                .replace("{OLDEST}", &oldest)
        })
    }

    /// The subscription.
    pub(crate) fn subscription(&self) -> &Subscription {
        &self.subscription
    }

    /// As `projection_state.subscription` stores it.
    pub(crate) fn stored(&self) -> &Option<serde_json::Value> {
        &self.stored
    }

    /// Whether every event is taken.
    pub(crate) fn takes_all(&self) -> bool {
        self.indexed.is_none()
    }

    /// How the step checks version order for this subscription.
    pub(crate) fn order_check(&self) -> OrderCheck {
        if self.takes_all() {
            OrderCheck::Consecutive
        } else if self.subscription.event_types().is_empty() {
            OrderCheck::Gaps
        } else {
            OrderCheck::Probed
        }
    }

    /// Whether each window row is the partition's event: one partition and
    /// every event ([`WINDOW_WHOLE`]: no [`FIRST`] or [`LAST`] rows).
    pub(crate) fn window_is_whole(&self, partitions: u32) -> bool {
        partitions == 1 && self.takes_all()
    }

    /// The window statement: `$1..$7` as the step binds them, then
    /// [`Feed::type_params`].
    pub(crate) fn window_sql(&self) -> &str {
        &self.window
    }

    /// The checkpoint statement: `$1..$12` as the step binds them, then
    /// [`Feed::type_params`].
    pub(crate) fn finish_sql(&self) -> &str {
        &self.finish
    }

    /// The live lag statement ([`LAG`]): `$1..$12` as the checkpoint
    /// statement binds them, then [`Feed::type_params`].
    pub(crate) fn lag_sql(&self) -> &str {
        &self.lag
    }

    /// What a subscription's statements bind after the common parameters:
    /// the indexed column's types, then the other column's if listed.
    /// Nothing for every event.
    pub(crate) fn type_params(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = Vec::with_capacity(2);
        match &self.indexed {
            Some(Types::One(name)) => params.push((name, Type::TEXT)),
            Some(Types::Many(names)) => params.push((names, Type::TEXT_ARRAY)),
            None => return params,
        }
        if let Some(other) = &self.other {
            params.push((other, Type::TEXT_ARRAY));
        }
        params
    }

    /// What a stored `projection_state.subscription` means.
    pub(crate) fn read_stored(
        projection: &str,
        stored: Option<serde_json::Value>,
    ) -> Result<Subscription> {
        match stored {
            None => Ok(Subscription::all()),
            Some(value) => serde_json::from_value(value).map_err(|e| Error::Config {
                option: "subscription",
                reason: format!(
                    "the subscription stored for `{projection}` in projection_state cannot be read \
                     ({e}); rebuild the projection to store its handler's"
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_reads_the_feed_index() {
        let feed = Feed::new(Subscription::all(), 4);
        assert!(feed.takes_all() && feed.stored().is_none());
        assert_eq!(feed.window_sql(), WINDOW_PARTITION);
        assert!(Feed::new(Subscription::all(), 1).window_is_whole(1));
        assert!(!feed.finish_sql().contains('{'), "every placeholder filled");
    }

    #[test]
    fn a_subscription_reads_through_its_narrowest_index() {
        let by_event = Feed::new(
            Subscription::all()
                .with_event_types(["B", "A"])
                .with_aggregate_types(["user"]),
            1,
        );
        assert!(!by_event.window_is_whole(1));
        let window = by_event.window_sql();
        assert!(
            window
                .contains("WHERE (event_type, transaction_id, global_position) > (t.name, $1, $2)"),
            "{window}"
        );
        assert!(
            window.contains("(event_type, transaction_id, global_position) > (t.name, $1, $2)")
        );
        assert!(window.contains("aggregate_type = ANY($9)"));
        let types: Vec<Type> = by_event.type_params().into_iter().map(|(_, t)| t).collect();
        assert_eq!(types, [Type::TEXT_ARRAY, Type::TEXT_ARRAY]);

        let by_aggregate = Feed::new(Subscription::all().with_aggregate_types(["user"]), 4);
        let window = by_aggregate.window_sql();
        assert!(
            window
                .contains("WHERE (aggregate_type, transaction_id, global_position) > ($8, $1, $2)"),
            "{window}"
        );
        assert!(!window.contains("$9"), "no other column: {window}");
        assert!(
            !window.contains("unnest"),
            "one type needs no merge: {window}"
        );
        let types: Vec<Type> = by_aggregate
            .type_params()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        assert_eq!(types, [Type::TEXT]);
        for sql in [
            by_aggregate.window_sql(),
            by_aggregate.finish_sql(),
            by_event.finish_sql(),
        ] {
            assert!(!sql.contains('{'), "every placeholder filled: {sql}");
        }
        assert!(!by_aggregate.finish_sql().contains("$14"));
        assert!(by_event.finish_sql().contains("$14"));
        assert_eq!(
            by_aggregate.stored(),
            &Some(serde_json::json!({ "aggregate_types": ["user"] }))
        );
    }
}
