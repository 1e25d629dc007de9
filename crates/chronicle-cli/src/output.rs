//! Tables for people, JSON for scripts.

use chronicle_core::EventEnvelope;
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use serde_json::{Value, json};

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned tables.
    Table,
    /// JSON: one object per line for lists, one object otherwise.
    Json,
}

/// An event as one JSON object with the table's column names plus
/// `global_position` and `transaction_id`.
pub fn event_json(e: &EventEnvelope) -> Value {
    json!({
        "event_id": e.event_id,
        "aggregate_id": e.aggregate_id,
        "aggregate_type": e.aggregate_type,
        "event_type": e.event_type,
        "event_data": e.event_data,
        "metadata": e.metadata.to_json(),
        "version": e.version,
        "timestamp": e.timestamp,
        "encrypted_fields": e.encrypted_fields,
        "global_position": e.position.global_position,
        "transaction_id": e.position.transaction_id,
    })
}

/// Prints events as a table or JSON lines.
pub fn print_events(events: &[EventEnvelope], format: OutputFormat) {
    match format {
        OutputFormat::Json => {
            for e in events {
                println!("{}", event_json(e));
            }
        }
        OutputFormat::Table => {
            let mut table = Table::new();
            table.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
                "position",
                "aggregate_id",
                "type",
                "version",
                "event_type",
                "timestamp",
                "event_data",
            ]);
            for e in events {
                let mut data = e.event_data.to_string();
                if data.len() > 60 {
                    let cut = (0..=57)
                        .rev()
                        .find(|&i| data.is_char_boundary(i))
                        .unwrap_or(0);
                    data.truncate(cut);
                    data.push('…');
                }
                table.add_row(vec![
                    e.position.to_string(),
                    e.aggregate_id.to_string(),
                    e.aggregate_type.clone(),
                    e.version.to_string(),
                    e.event_type.clone(),
                    e.timestamp.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
                    data,
                ]);
            }
            println!("{table}");
        }
    }
}

/// Prints key/value pairs as a two-column table, or a JSON object.
pub fn print_record(value: &Value, format: OutputFormat) {
    match format {
        OutputFormat::Json => println!("{value}"),
        OutputFormat::Table => {
            let mut table = Table::new();
            table.load_preset(UTF8_FULL_CONDENSED);
            if let Value::Object(map) = value {
                for (k, v) in map {
                    let text = match v {
                        Value::String(s) => s.clone(),
                        Value::Null => "-".to_owned(),
                        other => other.to_string(),
                    };
                    table.add_row(vec![k.clone(), text]);
                }
            }
            println!("{table}");
        }
    }
}
