//! Tables for people, JSON for scripts, on standard output.
//!
//! Every result goes through the `write_*` functions here, which return an
//! error instead of panicking as `println!` does when standard output is
//! gone: `chronicle read all | head -1` then ends quietly with exit code
//! [`EXIT_BROKEN_PIPE`](crate::EXIT_BROKEN_PIPE), as a process killed by
//! SIGPIPE would.

use std::fmt::{self, Display};
use std::io::Write;

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

/// Standard output could not be written. When the reader has gone (a
/// closed pipe: `| head`, a pager quit early) the command ends quietly
/// with exit code 141; any other failure (a full disk) is an error, exit 1.
#[derive(Debug, thiserror::Error)]
#[error("cannot write to standard output")]
pub struct StdoutError(#[source] pub std::io::Error);

impl StdoutError {
    /// Whether the reader of standard output has gone (EPIPE).
    pub fn is_closed_pipe(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

impl From<std::io::Error> for StdoutError {
    fn from(e: std::io::Error) -> Self {
        StdoutError(e)
    }
}

/// The result of writing to standard output.
pub type Result<T = ()> = std::result::Result<T, StdoutError>;

/// Writes `text` to standard output as it is, and flushes.
pub fn write_text(text: impl AsRef<[u8]>) -> Result {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_ref())?;
    out.flush()?;
    Ok(())
}

/// Writes each item on a line of its own, and flushes.
pub fn write_lines<T: Display>(lines: impl IntoIterator<Item = T>) -> Result {
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    Ok(())
}

/// Writes one formatted line; see [`outln`].
pub fn line(args: fmt::Arguments<'_>) -> Result {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// `println!` that returns the write's [`Result`] instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

pub(crate) use outln;

/// Writes a table and a line break.
pub fn write_table(table: &Table) -> Result {
    write_lines([table])
}

/// Writes JSON values one per line (a list in `--output json`).
pub fn write_json_lines(values: impl IntoIterator<Item = Value>) -> Result {
    write_lines(values)
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

/// Writes events as a table or JSON lines.
pub fn write_events(events: &[EventEnvelope], format: OutputFormat) -> Result {
    match format {
        OutputFormat::Json => write_json_lines(events.iter().map(event_json)),
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
            write_table(&table)
        }
    }
}

/// Writes key/value pairs as a two-column table, or one JSON object.
pub fn write_record(value: &Value, format: OutputFormat) -> Result {
    match format {
        OutputFormat::Json => write_lines([value]),
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
            write_table(&table)
        }
    }
}

/// Makes the panic of a `println!` (or `eprintln!`) into a closed pipe end
/// the process quietly with exit code 141 instead of a panic message. A
/// backstop: the CLI prints through the `write_*` functions, but a
/// library it calls may still print; every other panic is reported as
/// before.
pub fn exit_quietly_on_closed_pipe_panics() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        // std's words for it: "failed printing to stdout: Broken pipe (os
        // error 32)".
        if message.starts_with("failed printing to std") && message.contains("Broken pipe") {
            std::process::exit(i32::from(crate::EXIT_BROKEN_PIPE));
        }
        report(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_epipe_is_a_closed_pipe() {
        let closed = StdoutError(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(closed.is_closed_pipe());
        let full = StdoutError(std::io::Error::other("no space left"));
        assert!(!full.is_closed_pipe());
        let chained = anyhow::Error::from(closed).context("printing the events");
        assert!(
            chained
                .chain()
                .any(|c| c.downcast_ref::<StdoutError>().is_some())
        );
    }
}
