//! The shared harness: `chronicle_postgres::testing`.

pub use chronicle_postgres::testing::*;
