//! Run a Chronicle projection in a Cloudflare Worker.
//!
//! The Worker runs the same portable step as every other runtime
//! (`chronicle_step::ProjectionStep`), on one PostgreSQL connection
//! opened per invocation over `worker::Socket`: through the Hyperdrive
//! binding `DB` when the Worker has one (production), else to the secret
//! `DATABASE_URL` (local runs). Leases are rows and locks are
//! transaction-scoped, so Hyperdrive's transaction pooling is safe.
//!
//! A user's Worker is a small crate of theirs that hands its handler to
//! `run_scheduled` (a cron trigger: every partition, as long as the
//! invocation's budget allows) and `run_queue` (a queue message wakes it
//! for the partitions it names). An invocation killed midway loses nothing:
//! its transaction never commits, the lease expires, and the next
//! invocation redoes the window.
//!
//! This crate is empty outside `wasm32` (its items, and the links to
//! them, exist only there).
#![cfg_attr(not(target_arch = "wasm32"), allow(unused))]
#![deny(missing_docs)]

#[cfg(target_arch = "wasm32")]
mod wasm;

#[cfg(target_arch = "wasm32")]
pub use wasm::*;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub use worker as __worker;

/// The Worker's entry points for one projection: a cron trigger
/// (`scheduled`) and a queue consumer (`queue`, messages of `Wake`),
/// both running `$handler` with `$options` through `run_scheduled` and
/// `run_queue`. The crate that calls it needs `worker` as a dependency
/// (the event macros refer to it) and `crate-type = ["cdylib"]`.
///
/// ```ignore
/// chronicle_worker::projection_worker!(
///     user_profile::projection::UserProfileProjection::default(),
///     chronicle_step::ProjectionOptions::default(),
///     Some("user_profile") // the read model's schema, or None
/// );
/// ```
///
/// A failed queue invocation rejects its promise, so the queue delivers
/// the batch again (its retries, then its dead-letter queue); worker
/// 0.8's `#[event(queue)]` would trap instead, so the export is written
/// out here.
// rustfmt re-indents the attribute's arguments on every run: skip it.
#[rustfmt::skip]
#[macro_export]
macro_rules! projection_worker {
    ($handler:expr, $options:expr, $schema:expr) => {
        /// The cron trigger: steps every partition within the budget.
        #[::worker::event(scheduled)]
        pub async fn scheduled(
            _event: ::worker::ScheduledEvent,
            env: ::worker::Env,
            _ctx: ::worker::ScheduleContext,
        ) {
            let outcome = match $crate::WorkerSettings::from_env(&env, $options) {
                Ok(mut settings) => {
                    settings.read_model_schema = $schema.map(::std::string::String::from);
                    $crate::run_scheduled(&env, $handler, &settings).await
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(report) => ::worker::console_log!("chronicle projection step: {:?}", report),
                Err(e) => ::worker::console_error!("chronicle projection step failed: {}", e),
            }
        }

        /// The queue consumer: steps the partitions the batch names.
        #[::worker::wasm_bindgen::prelude::wasm_bindgen(
                            wasm_bindgen = ::worker::wasm_bindgen,
                            wasm_bindgen_futures = ::worker::wasm_bindgen_futures,
                            js_sys = ::worker::js_sys
                        )]
        pub async fn queue(
            batch: ::worker::worker_sys::MessageBatch,
            env: ::worker::Env,
            _ctx: ::worker::worker_sys::Context,
        ) -> ::std::result::Result<::worker::wasm_bindgen::JsValue, ::worker::wasm_bindgen::JsValue>
        {
            let batch = ::worker::MessageBatch::<$crate::Wake>::from(batch);
            let outcome = match $crate::WorkerSettings::from_env(&env, $options) {
                Ok(mut settings) => {
                    settings.read_model_schema = $schema.map(::std::string::String::from);
                    $crate::run_queue(&env, &batch, $handler, &settings).await
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(report) => {
                    ::worker::console_log!("chronicle projection step: {:?}", report);
                    Ok(::worker::wasm_bindgen::JsValue::UNDEFINED)
                }
                Err(e) => Err(::worker::js_sys::Error::new(&e.to_string()).into()),
            }
        }
    };
}
