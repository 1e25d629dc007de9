//! Integration tests of the projection runtime, against a real PostgreSQL.

mod support;

mod ledger;

mod adapter;
mod blue_green;
mod catch_up;
mod dead_letters;
mod kill9;
mod leases;
mod metrics;
mod queue;
mod retries;
mod subscriptions;
mod upcasting;
mod webhook;
