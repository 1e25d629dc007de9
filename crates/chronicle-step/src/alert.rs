//! Alert sinks.

use async_trait::async_trait;
use chronicle_core::{Alert, AlertSink, BoxError};

/// Writes every alert to the log as a structured `tracing` warning (the
/// default sink; always on).
#[derive(Debug, Clone, Copy, Default)]
pub struct LogAlertSink;

#[async_trait]
impl AlertSink for LogAlertSink {
    async fn alert(&self, alert: &Alert) -> Result<(), BoxError> {
        let json = serde_json::to_string(alert)?;
        tracing::warn!(target: "chronicle::alert", alert = %json, "projection alert");
        Ok(())
    }
}
