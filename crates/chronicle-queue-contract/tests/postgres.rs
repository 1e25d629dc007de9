//! The PostgreSQL dead-letter queue passes the contract: messages are
//! events (UUID ids, aggregate ids as groups, versions in order), the
//! visibility timeout is zero and `delivery_count` is the handler
//! attempts, not the deliveries.

use async_trait::async_trait;
use chronicle_core::{EventEnvelope, Message, ProjectionHandler, ProjectionResult};
use chronicle_postgres::testing::fresh_db;
use chronicle_projections::{PgContext, PgDeadLetterQueue, PgProjection, ProjectionOptions};
use chronicle_queue_contract::{Spec, run_contract};
use serde_json::json;
use uuid::Uuid;

struct Nothing(String);

#[async_trait]
impl ProjectionHandler<PgContext> for Nothing {
    fn name(&self) -> &str {
        &self.0
    }

    async fn handle(&self, _: &EventEnvelope, _: &mut PgContext) -> ProjectionResult {
        ProjectionResult::Done
    }
}

/// A made-up event of aggregate `group` at version `seq`.
fn event_message(group: &str, seq: u32) -> Message {
    Message::new(
        Uuid::now_v7().to_string(),
        group,
        json!({ "event_type": "ContractChecked", "version": seq, "position": format!("{}-{seq}", 1000 + seq) }),
    )
    .with_attribute("attempts", "0")
}

#[tokio::test]
async fn the_postgres_dead_letter_queue_passes() {
    let db = fresh_db().await;
    let spec = Spec {
        counts_deliveries: false,
        message: event_message,
        ..Spec::default()
    };
    let pool = db.pool.clone();
    run_contract(&spec, move |name: String| {
        let pool = pool.clone();
        async move {
            let projection = PgProjection::new(
                pool.clone(),
                Nothing(name.clone()),
                ProjectionOptions::default(),
            )
            .unwrap();
            projection.register().await.unwrap();
            PgDeadLetterQueue::new(pool, name)
        }
    })
    .await;
}
