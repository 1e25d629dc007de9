//! `chronicle append --file` (or JSON lines on stdin): an import that
//! validates every line first and then commits all of it in one
//! transaction, or, with `--batch-size`, in chunks that `--resume-from`
//! continues after a failure.

use std::collections::HashMap;
use std::io::BufRead;

use anyhow::{Context, Result, bail};
use chronicle_core::NewEvent;
use chronicle_postgres::{AppendAllError, AppendRequest};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::Database;
use crate::commands::UsageError;
use crate::output::{OutputFormat, write_record};
use crate::ui::{note, notice};

/// One JSON line of `chronicle append --file`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppendLine {
    aggregate_id: Uuid,
    aggregate_type: String,
    event_type: String,
    #[serde(alias = "event_data")]
    data: Value,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    event_id: Option<Uuid>,
    #[serde(default)]
    expected_version: Option<Value>,
}

/// A parsed line and its number in the input (1-based, blank lines
/// counted), as errors and `--resume-from` name it.
struct Line {
    number: usize,
    had_id: bool,
    request: AppendRequest,
}

/// How to commit an import.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ImportOptions {
    /// Lines per transaction; `None`: the whole input in one.
    pub batch_size: Option<usize>,
    /// The first line to import; earlier lines are skipped unread.
    pub resume_from: Option<usize>,
}

/// Reads JSON lines from `input`, checks them all, and appends them: all or
/// nothing, or batch by batch.
pub(crate) async fn import(
    db: &Database,
    input: impl BufRead,
    options: ImportOptions,
    format: OutputFormat,
) -> Result<()> {
    let (lines, last_line) = read_lines(input, options.resume_from.unwrap_or(1))?;
    if lines.is_empty() {
        if let Some(from) = options.resume_from.filter(|&from| from > last_line) {
            bail!(UsageError(format!(
                "--resume-from {from} is past the input's last line ({last_line}); nothing to import"
            )));
        }
        bail!(UsageError(
            "no events given: pass --aggregate-id, --aggregate-type, --event-type and --data, or JSON lines on stdin / --file".into()
        ));
    }
    let store = db.store().await?;
    // Every line is checked before anything is sent.
    let mut ids: HashMap<Uuid, usize> = HashMap::with_capacity(lines.len());
    for line in &lines {
        let r = &line.request;
        store
            .validate(r.aggregate_id, &r.aggregate_type, r.expected, &r.events)
            .map_err(|v| {
                UsageError(format!(
                    "line {}: invalid {}: {}; nothing was stored",
                    line.number,
                    line_field(&v.field),
                    v.reason
                ))
            })?;
        let id = r.events[0].event_id;
        if let Some(first) = ids.insert(id, line.number) {
            bail!(UsageError(format!(
                "line {}: event_id {id} is also the id on line {first}; every event needs its own \
                 id; nothing was stored",
                line.number
            )));
        }
    }
    if options.batch_size.is_some() && lines.iter().any(|l| !l.had_id) {
        notice!(
            "warning: some lines have no event_id, so they get a new id on every run; after a \
             failure resume with --resume-from as printed, or give each line an event_id so that \
             a rerun from the start stores nothing twice"
        );
    }
    let batch_size = options.batch_size.unwrap_or(lines.len());
    let first_line = lines[0].number;
    let (mut appended, mut already) = (0usize, 0usize);
    let mut committed_through: Option<usize> = None;
    for chunk in lines.chunks(batch_size) {
        let requests: Vec<AppendRequest> = chunk.iter().map(|l| l.request.clone()).collect();
        let outcomes = match store.append_all(&requests).await {
            Ok(outcomes) => outcomes,
            Err(e) => return Err(failure(e, chunk, first_line, committed_through)),
        };
        for (line, outcome) in chunk.iter().zip(outcomes) {
            if outcome.appended {
                appended += 1;
            } else {
                already += 1;
            }
            write_record(
                &json!({
                    "line": line.number,
                    "aggregate_id": line.request.aggregate_id,
                    "event_id": line.request.events[0].event_id,
                    "version": outcome.version,
                    "appended": outcome.appended,
                }),
                format,
            )?;
        }
        committed_through = chunk.last().map(|l| l.number);
    }
    note!(
        "committed lines {first_line}-{}: {appended} event(s) appended, {already} already stored, \
         in {} transaction(s)",
        committed_through.unwrap_or(first_line),
        lines.len().div_ceil(batch_size)
    );
    Ok(())
}

/// The error of a failed batch: the line and what went wrong, and (on
/// standard error) what was committed before it and how to go on.
fn failure(
    e: AppendAllError,
    chunk: &[Line],
    first_line: usize,
    committed_through: Option<usize>,
) -> anyhow::Error {
    let batch_start = chunk[0].number;
    match committed_through {
        None => notice!(
            "nothing was stored: the failed transaction held every line from {batch_start} on"
        ),
        Some(last) => notice!(
            "lines {first_line}-{last} are committed (last committed line: {last}); lines from \
             {batch_start} on are not: fix the input and rerun with --resume-from {batch_start}"
        ),
    }
    let what = match e.index.and_then(|i| chunk.get(i)) {
        Some(line) => format!(
            "line {}: append to aggregate {} failed",
            line.number, line.request.aggregate_id
        ),
        None => format!(
            "the transaction of lines {batch_start}-{} failed",
            chunk[chunk.len() - 1].number
        ),
    };
    anyhow::Error::new(e.source).context(what)
}

/// The store's field name for one event (`events[0].event_data`) as the
/// input line spells it (`data`).
fn line_field(field: &str) -> &str {
    match field.strip_prefix("events[0].").unwrap_or(field) {
        "event_data" => "data",
        other => other,
    }
}

/// Reads and parses the lines from `from` on; also returns the number of
/// the input's last line. Invalid UTF-8 and lines that do not parse are
/// usage errors naming the line (and, for UTF-8, the byte offset).
fn read_lines(mut input: impl BufRead, from: usize) -> Result<(Vec<Line>, usize)> {
    let mut lines = Vec::new();
    let mut buf = Vec::new();
    let (mut number, mut offset) = (0usize, 0usize);
    loop {
        buf.clear();
        let read = input
            .read_until(b'\n', &mut buf)
            .context("cannot read the input")?;
        if read == 0 {
            break;
        }
        number += 1;
        let start = offset;
        offset += read;
        if number < from {
            continue;
        }
        let text = match std::str::from_utf8(&buf) {
            Ok(text) => text,
            Err(e) => bail!(UsageError(format!(
                "line {number}: invalid UTF-8 at byte offset {} of the input (byte {} of the \
                 line); the input must be UTF-8 JSON lines; nothing was stored",
                start + e.valid_up_to(),
                e.valid_up_to() + 1
            ))),
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let what = format!("line {number}");
        let parsed: AppendLine = serde_json::from_str(text)
            .map_err(|e| UsageError(format!("{what}: {e}; nothing was stored")))?;
        let metadata = crate::commands::parse_metadata(parsed.metadata, &what)?;
        let expected = crate::commands::parse_expected(parsed.expected_version, &what)?;
        let mut event = NewEvent::new(parsed.event_type, parsed.data).with_metadata(metadata);
        if let Some(id) = parsed.event_id {
            event = event.with_id(id);
        }
        lines.push(Line {
            number,
            had_id: parsed.event_id.is_some(),
            request: AppendRequest {
                aggregate_id: parsed.aggregate_id,
                aggregate_type: parsed.aggregate_type,
                expected,
                events: vec![event],
            },
        });
    }
    Ok((lines, number))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_utf8_names_the_line_and_the_byte_offset() {
        let input: &[u8] = b"\n{\"a\":1}\n{\"b\":\"\xff\"}\n";
        let err = read_lines(input, 3).map(|_| ()).unwrap_err();
        let usage = err.downcast_ref::<UsageError>().expect("a usage error");
        assert!(
            usage.0.contains(
                "line 3: invalid UTF-8 at byte offset 15 of the input (byte 7 of the line)"
            ),
            "{usage}"
        );
    }

    #[test]
    fn lines_before_resume_from_are_skipped_unread() {
        let good = r#"{"aggregate_id":"0193a1b2-0000-7000-8000-000000000002","aggregate_type":"order","event_type":"Placed","data":{}}"#;
        let input = format!("not json\n\n{good}\n");
        let (lines, last) = read_lines(input.as_bytes(), 3).unwrap();
        assert_eq!((lines.len(), lines[0].number, last), (1, 3, 3));
        assert_eq!(line_field("events[0].event_data"), "data");
        assert_eq!(line_field("aggregate_type"), "aggregate_type");
    }
}
