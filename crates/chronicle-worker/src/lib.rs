//! Run a Chronicle projection in a Cloudflare Worker.
//!
//! The Worker runs the same portable step as every other runtime
//! ([`chronicle_step::ProjectionStep`]), on one PostgreSQL connection
//! opened per invocation over `worker::Socket`: through the Hyperdrive
//! binding `DB` when the Worker has one (production), else to the secret
//! `DATABASE_URL` (local runs). Leases are rows and locks are
//! transaction-scoped, so Hyperdrive's transaction pooling is safe.
//!
//! A user's Worker is a small crate of theirs that hands its handler to
//! [`run_scheduled`] (a cron trigger: every partition, as long as the
//! invocation's budget allows) and [`run_queue`] (a queue message wakes it
//! for the partitions it names). An invocation killed midway loses nothing:
//! its transaction never commits, the lease expires, and the next
//! invocation redoes the window.
//!
//! This crate is empty outside `wasm32`.
#![cfg_attr(not(target_arch = "wasm32"), allow(unused))]
#![deny(missing_docs)]

#[cfg(target_arch = "wasm32")]
mod wasm;

#[cfg(target_arch = "wasm32")]
pub use wasm::*;
