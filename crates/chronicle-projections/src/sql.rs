//! Wire types and row decoding shared by the step and the dead-letter queue:
//! the store's own, re-exported under the names this crate uses.

pub(crate) use chronicle_postgres::sql::{
    EVENT_COLUMNS as COLUMNS, Xid8, decode_event as envelope,
};
