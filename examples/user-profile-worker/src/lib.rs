//! The `user-profile` projection as a Cloudflare Worker.
//!
//! Build with `worker-build --release` (see docs/providers.md); run locally
//! in Miniflare, deploy with `chronicle deploy`. The handler is the
//! example's own, unchanged: this crate only hands it to Chronicle's
//! Worker entry points.
#![cfg(target_arch = "wasm32")]

chronicle_worker::projection_worker!(
    user_profile::projection::UserProfileProjection::default(),
    chronicle_step::ProjectionOptions {
        partitions: 2,
        batch_size: 200,
        ..chronicle_step::ProjectionOptions::default()
    },
    Some(user_profile::projection::READ_MODEL_SCHEMA)
);
