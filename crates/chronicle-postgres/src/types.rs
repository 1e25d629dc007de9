//! Wire types the store needs that tokio-postgres does not provide.

use std::error::Error as StdError;

use bytes::BytesMut;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// JSON already serialized to text, sent as `jsonb` without parsing it
/// again on the client (the binary jsonb format is a version byte and text).
#[derive(Debug, Clone)]
pub(crate) struct JsonbText(pub String);

impl ToSql for JsonbText {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}
