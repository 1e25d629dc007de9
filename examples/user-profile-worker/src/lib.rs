//! The `user-profile` projection as a Cloudflare Worker.
//!
//! Build with `worker-build --release` (see docs/providers.md); run locally
//! in Miniflare, deploy with `chronicle deploy`. The handler is the
//! example's own, unchanged: this crate only hands it to Chronicle's
//! Worker entry points. With the feature `lenient` it runs the "fixed"
//! handler that skips events that do not decode.
#![cfg(target_arch = "wasm32")]

use user_profile::projection::{READ_MODEL_SCHEMA, UserProfileProjection};

/// The example's handler; with the feature `lenient`, the fixed one.
fn handler() -> UserProfileProjection {
    let handler = UserProfileProjection::default();
    if cfg!(feature = "lenient") {
        handler.lenient();
    }
    handler
}

/// The options compiled in; a deployment's variables override them.
fn options() -> chronicle_step::ProjectionOptions {
    chronicle_step::ProjectionOptions {
        partitions: 2,
        batch_size: 200,
        ..chronicle_step::ProjectionOptions::default()
    }
}

chronicle_worker::projection_worker!(handler(), options(), Some(READ_MODEL_SCHEMA));
