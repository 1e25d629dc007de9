//! The adapter contract against [`LocalAdapter`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chronicle_adapter_contract::{PARTITIONS, PROJECTION, Subject, run};
use chronicle_core::ProjectionAdapter;
use chronicle_postgres::testing::fresh_db;
use chronicle_projections::{LocalAdapter, PgContext, ProjectionOptions, RunnerOptions};
use user_profile::projection::READ_MODEL_SCHEMA;

struct Local(Arc<LocalAdapter>);

#[async_trait]
impl Subject for Local {
    fn provider(&self) -> &'static str {
        "local"
    }

    /// One adapter: it runs the handler object it is given.
    async fn adapter(&self, _fixed: bool) -> Arc<dyn ProjectionAdapter<PgContext>> {
        self.0.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_adapter_passes_the_contract() {
    let db = fresh_db().await;
    let adapter = LocalAdapter::new(
        db.pool.clone(),
        ProjectionOptions {
            partitions: PARTITIONS,
            ..ProjectionOptions::default()
        },
        RunnerOptions {
            poll_interval: Duration::from_millis(50),
            ..RunnerOptions::default()
        },
    )
    .with_read_model_schema(PROJECTION, READ_MODEL_SCHEMA);
    run(&Local(Arc::new(adapter)), &db).await;
}
