//! Wire types the store needs that tokio-postgres does not provide.

use std::error::Error as StdError;

use bytes::BytesMut;
use chronicle_core::Metadata;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

/// A PostgreSQL `xid8` (a 64-bit transaction id), sent and read in binary.
///
/// ```
/// use chronicle_sql::Xid8;
///
/// assert!(Xid8(7) < Xid8(8));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Xid8(pub u64);

impl<'a> FromSql<'a> for Xid8 {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let bytes: [u8; 8] = raw.try_into().map_err(|_| "xid8 is not 8 bytes")?;
        Ok(Xid8(u64::from_be_bytes(bytes)))
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "xid8"
    }
}

impl ToSql for Xid8 {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        out.extend_from_slice(&self.0.to_be_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "xid8"
    }

    to_sql_checked!();
}

/// The `metadata` column decoded straight from the wire into [`Metadata`],
/// without building a JSON tree first. `NULL` or a non-object gives the
/// default metadata, as [`Metadata::from_json`] does.
pub(crate) struct MetadataColumn(pub Metadata);

impl<'a> FromSql<'a> for MetadataColumn {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        let text = if *ty == Type::JSONB {
            match raw.split_first() {
                Some((1, rest)) => rest,
                _ => return Err("unsupported jsonb encoding version".into()),
            }
        } else {
            raw
        };
        Ok(MetadataColumn(
            match serde_json::from_slice::<Metadata>(text) {
                Ok(m) => m,
                Err(_) => Metadata::from_json(serde_json::from_slice(text).ok()),
            },
        ))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn StdError + Sync + Send>> {
        Ok(MetadataColumn(Metadata::default()))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB || *ty == Type::JSON
    }
}
