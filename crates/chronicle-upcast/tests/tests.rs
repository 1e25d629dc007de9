//! Integration tests of eager and lazy upcasting against a real PostgreSQL.

mod upcast;
