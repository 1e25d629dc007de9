//! [`PgEventStore::append_all`]: many appends in one transaction, all
//! stored or none (what `chronicle append --file` imports with).

use std::collections::HashMap;

use chronicle_core::{
    AggregateId, AppendOutcome, Error as CoreError, ExpectedVersion, NewEvent, Validation,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

use crate::PgEventStore;

/// One append of the list given to [`PgEventStore::append_all`]: events for
/// one aggregate at an expected version, as [`chronicle_core::EventAppender::append`]
/// takes them.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    /// The aggregate appended to.
    pub aggregate_id: AggregateId,
    /// The aggregate's type (at most 50 characters).
    pub aggregate_type: String,
    /// The version the aggregate must be at when this append runs (the
    /// appends before it in the list count).
    pub expected: ExpectedVersion,
    /// The events, at least one.
    pub events: Vec<NewEvent>,
}

/// Why [`PgEventStore::append_all`] stored nothing: which append of the
/// list failed (none when the failure belongs to no one append: the
/// connection, or the commit) and why.
#[derive(Debug, thiserror::Error)]
#[error("{}nothing of the list was stored", .index.map(|i| format!("append {i} failed, ")).unwrap_or_default())]
pub struct AppendAllError {
    /// The failed append's index in the list.
    pub index: Option<usize>,
    /// What went wrong: a validation, a conflict, a duplicate id, a backend
    /// failure.
    #[source]
    pub source: CoreError,
}

impl AppendAllError {
    fn at(index: usize, source: impl Into<CoreError>) -> Self {
        AppendAllError {
            index: Some(index),
            source: source.into(),
        }
    }

    fn backend(source: impl Into<crate::Error>) -> Self {
        AppendAllError {
            index: None,
            source: source.into().into(),
        }
    }
}

impl PgEventStore {
    /// Checks an append as [`chronicle_core::EventAppender::append`] would,
    /// without sending anything: names, ids, data shapes, sizes, and what
    /// `jsonb` cannot store.
    ///
    /// ```no_run
    /// # fn demo(store: chronicle_postgres::PgEventStore) {
    /// use chronicle_core::{ExpectedVersion, NewEvent};
    /// let event = NewEvent::new("Noted", serde_json::json!({ "text": "C:\\u0000dir" }));
    /// assert!(store.validate(uuid::Uuid::now_v7(), "note", ExpectedVersion::Any, &[event]).is_ok());
    /// # }
    /// ```
    pub fn validate(
        &self,
        aggregate_id: AggregateId,
        aggregate_type: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<(), Validation> {
        self.prepare(aggregate_id, aggregate_type, expected, events)
            .map(drop)
    }

    /// Runs `appends` in order in one transaction: every one is validated
    /// before anything is sent, and either all are stored or none is. Each
    /// append's expected version sees the appends before it. Appending
    /// events whose ids are stored already, as the same append, stores
    /// nothing and reports `appended: false` (so a list can be run again
    /// safely); the outcomes come in the order of `appends`.
    ///
    /// Statements are sent unnamed, so this works behind any pooler (in
    /// transaction mode the transaction keeps one server connection).
    ///
    /// ```no_run
    /// # async fn demo(store: chronicle_postgres::PgEventStore) -> Result<(), Box<dyn std::error::Error>> {
    /// use chronicle_core::{ExpectedVersion, NewEvent};
    /// use chronicle_postgres::AppendRequest;
    /// use serde_json::json;
    ///
    /// let order = uuid::Uuid::now_v7();
    /// let outcomes = store
    ///     .append_all(&[
    ///         AppendRequest {
    ///             aggregate_id: order,
    ///             aggregate_type: "order".into(),
    ///             expected: ExpectedVersion::NoStream,
    ///             events: vec![NewEvent::new("Placed", json!({ "total": 12 }))],
    ///         },
    ///         AppendRequest {
    ///             aggregate_id: order,
    ///             aggregate_type: "order".into(),
    ///             expected: ExpectedVersion::Exact(1),
    ///             events: vec![NewEvent::new("Paid", json!({}))],
    ///         },
    ///     ])
    ///     .await?;
    /// assert_eq!(outcomes[1].version, 2);
    /// # Ok(()) }
    /// ```
    pub async fn append_all(
        &self,
        appends: &[AppendRequest],
    ) -> Result<Vec<AppendOutcome>, AppendAllError> {
        let mut prepared = Vec::with_capacity(appends.len());
        let mut owners: HashMap<uuid::Uuid, usize> = HashMap::new();
        for (i, a) in appends.iter().enumerate() {
            let p = self
                .prepare(a.aggregate_id, &a.aggregate_type, a.expected, &a.events)
                .map_err(|v| AppendAllError::at(i, v))?;
            for (k, id) in p.ids.iter().enumerate() {
                if let Some(first) = owners.insert(*id, i)
                    && first != i
                {
                    return Err(AppendAllError::at(
                        i,
                        Validation::new(
                            format!("events[{k}].event_id"),
                            format!(
                                "{id} is also the id of an event of append {first}; every event \
                                 needs its own id"
                            ),
                        ),
                    ));
                }
            }
            prepared.push(p);
        }
        let mut client = self.pool().get().await.map_err(AppendAllError::backend)?;
        let tx = client
            .transaction()
            .await
            .map_err(AppendAllError::backend)?;
        let mut outcomes = Vec::with_capacity(appends.len());
        for (i, (a, p)) in appends.iter().zip(&prepared).enumerate() {
            let expected: Option<i32> = a.expected.as_option().map(|v| v as i32);
            let params: [(&(dyn ToSql + Sync), Type); 8] = [
                (&a.aggregate_id, Type::UUID),
                (&a.aggregate_type, Type::TEXT),
                (&expected, Type::INT4),
                (&p.ids, Type::UUID_ARRAY),
                (&p.types, Type::TEXT_ARRAY),
                (&p.data, Type::JSONB_ARRAY),
                (&p.metadata, Type::JSONB_ARRAY),
                (&p.encrypted, Type::JSONB_ARRAY),
            ];
            let result = tx
                .query_typed_one(
                    "SELECT status, version FROM chronicle_append($1, $2, $3, $4, $5, $6, $7, $8)",
                    &params,
                )
                .await;
            let row = match result {
                Ok(row) => row,
                // Part of the append collided with stored rows (ids of
                // another aggregate, or versions a concurrent writer
                // took): the transaction is void; find out which.
                Err(e)
                    if e.code().is_some_and(|c| {
                        c.code() == crate::store::PARTIAL_APPEND || *c == SqlState::UNIQUE_VIOLATION
                    }) =>
                {
                    drop(tx);
                    drop(client);
                    if let Some(event_id) = self
                        .first_stored(&p.ids)
                        .await
                        .map_err(AppendAllError::backend)?
                    {
                        return Err(AppendAllError::at(
                            i,
                            CoreError::DuplicateEventId { event_id },
                        ));
                    }
                    let actual = self
                        .current_version(a.aggregate_id)
                        .await
                        .map_err(AppendAllError::backend)?;
                    return Err(AppendAllError::at(
                        i,
                        CoreError::Conflict {
                            aggregate_id: a.aggregate_id,
                            expected: a.expected,
                            actual,
                        },
                    ));
                }
                Err(e) => return Err(AppendAllError::at(i, crate::Error::from(e))),
            };
            let (status, version): (i32, i32) = (row.get(0), row.get(1));
            let version = u32::try_from(version).unwrap_or(0);
            outcomes.push(match status {
                0 | 1 => AppendOutcome {
                    version,
                    appended: status == 0,
                },
                2 => {
                    return Err(AppendAllError::at(
                        i,
                        CoreError::Conflict {
                            aggregate_id: a.aggregate_id,
                            expected: a.expected,
                            actual: version,
                        },
                    ));
                }
                _ => {
                    return Err(AppendAllError::at(
                        i,
                        CoreError::DuplicateEventId { event_id: p.ids[0] },
                    ));
                }
            });
        }
        tx.commit().await.map_err(AppendAllError::backend)?;
        Ok(outcomes)
    }
}
