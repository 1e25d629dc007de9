//! Unix manners, through the binary: a closed pipe ends a command quietly,
//! no input makes any subcommand panic, every command's `--output json` is
//! JSON, every help has an example, completions and manual pages are
//! generated and valid, and `--quiet`, `--verbose`, progress bars and log
//! colours behave the same on every command.
//!
//! The subcommands are enumerated from the command line's own definition
//! (`Cli::command()`), so a new one is covered without editing this file.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use serde_json::Value;

mod support;

use support::{fresh_database, json_lines, ok, psql_value};

/// A valid UUID, and so also a valid name, subject or event type.
const ID: &str = "0193a1b2-0000-7000-8000-000000000001";

/// The exit code of a closed standard output.
const EXIT_BROKEN_PIPE: i32 = 141;

/// Subcommands that would start long-running work (or touch the cluster
/// of `dev`): the no-panic test feeds them only command lines that clap
/// refuses, and asserts that it does.
const LONG_RUNNING: &[&[&str]] = &[
    &["demo"],
    &["bench"],
    &["projections", "run"],
    &["dev", "start"],
    &["dev", "stop"],
    &["dev", "reset"],
];

/// The command line's definition, built (global options propagated).
fn definition() -> clap::Command {
    let mut cmd = chronicle_cli::Cli::command();
    cmd.build();
    cmd
}

/// Every subcommand below `cmd`, depth first, with its path (clap's own
/// `help` subcommand left out).
fn subcommands(cmd: &clap::Command) -> Vec<(Vec<String>, clap::Command)> {
    fn walk(cmd: &clap::Command, path: &[String], out: &mut Vec<(Vec<String>, clap::Command)>) {
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let mut path = path.to_vec();
            path.push(sub.get_name().to_owned());
            out.push((path.clone(), sub.clone()));
            walk(sub, &path, out);
        }
    }
    let mut out = Vec::new();
    walk(cmd, &[], &mut out);
    out
}

/// The subcommands that run something (no subcommands of their own).
fn leaves() -> Vec<(Vec<String>, clap::Command)> {
    subcommands(&definition())
        .into_iter()
        .filter(|(_, c)| !c.has_subcommands())
        .collect()
}

fn is_long_running(path: &[String]) -> bool {
    LONG_RUNNING
        .iter()
        .any(|prefix| path.len() >= prefix.len() && path.iter().zip(*prefix).all(|(a, b)| a == b))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn explain(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// A fresh, migrated database.
fn migrated() -> String {
    let url = fresh_database();
    ok(&support::chronicle(Some(&url), &["migrate"], None));
    url
}

/// `n` events of 1 KiB straight into the table.
fn fill(url: &str, n: usize) {
    psql_value(
        url,
        &format!(
            "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, event_data, metadata, version) \
             SELECT gen_random_uuid(), md5('a' || g)::uuid, 'thing', 'Happened', \
                    jsonb_build_object('n', g, 'pad', repeat('x', 1000)), '{{\"schema_version\":1}}', 1 \
               FROM generate_series(1, {n}) AS g"
        ),
    );
}

/// Runs `cmd` with its standard output closed after reading `lines` lines
/// of it (none: closed at once), as `| head` does; the first lines read and
/// the finished process.
fn with_stdout_closed_after(mut cmd: Command, lines: usize) -> (Vec<String>, Output) {
    cmd.env("RUST_BACKTRACE", "1");
    let mut child = cmd.spawn().expect("run chronicle");
    drop(child.stdin.take());
    let mut read = Vec::new();
    {
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        for _ in 0..lines {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read a line");
            read.push(line);
        }
        // Dropped here: the pipe's reading end is closed.
    }
    let out = child.wait_with_output().expect("chronicle finishes");
    (read, out)
}

fn assert_quiet_141(what: &str, out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(EXIT_BROKEN_PIPE),
        "{what}: a closed pipe exits 141\n{}",
        explain(out)
    );
    assert!(
        out.stderr.is_empty(),
        "{what}: nothing on stderr (no panic, no backtrace, no error): {}",
        text(&out.stderr)
    );
}

#[test]
fn a_closed_pipe_ends_the_command_quietly_with_141() {
    let url = migrated();
    fill(&url, 2000);
    // Far more than a pipe holds: the writes after `head` left must fail.
    for args in [
        &["read", "all", "--limit", "2000", "--output", "json"][..],
        &["read", "all", "--limit", "2000"],
        &[
            "read", "type", "Happened", "--limit", "2000", "--output", "json",
        ],
    ] {
        let (first, out) = with_stdout_closed_after(support::command(Some(&url), args), 1);
        assert_quiet_141(&args.join(" "), &out);
        if args.contains(&"json") {
            let event: Value = serde_json::from_str(&first[0]).expect("a whole JSON line");
            assert_eq!(event["event_type"], "Happened");
        }
    }
    // Closed before anything is written: every command's first write fails.
    for args in [
        &["status"][..],
        &["projections", "list", "--output", "json"],
        &["man"],
        &["completions", "bash"],
    ] {
        let (_, out) = with_stdout_closed_after(support::command(Some(&url), args), 0);
        assert_quiet_141(&args.join(" "), &out);
    }
    // The demo still prints with `println!`: the panic hook's backstop.
    let demo = fresh_database();
    let (_, out) = with_stdout_closed_after(support::command(Some(&demo), &["demo"]), 0);
    assert_quiet_141("demo", &out);
}

/// Command-line values no command expects.
fn garbage() -> Vec<OsString> {
    let mut values: Vec<OsString> = [
        "",
        " ",
        "-1",
        "0",
        "18446744073709551616",
        "99999999999999999999999999999999999999",
        "1e400",
        "inf",
        "NaN",
        "not-a-uuid",
        "0193a1b2-0000-7000-8000",
        "'; DROP TABLE events; --",
        "💥 ünïcödé",
        "a\nb",
        "{\"json\": [1, 2",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    values.push("x".repeat(5000).into());
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        values.push(OsString::from_vec(vec![0x66, 0x6f, 0xff, 0xfe, 0x6f]));
    }
    values
}

/// A value each positional of `cmd` accepts: its first possible value, or
/// [`ID`].
fn valid_positionals(cmd: &clap::Command) -> Vec<OsString> {
    let mut valid: Vec<OsString> = Vec::new();
    for a in cmd.get_positionals() {
        let value = match a.get_possible_values().first() {
            Some(value) => OsString::from(value.get_name()),
            // An id where one parses (most positionals), else a count: a
            // candidate is wrong when clap says the value is invalid.
            None => [ID, "1"]
                .into_iter()
                .map(OsString::from)
                .find(|candidate| {
                    let args = std::iter::once(OsString::from("chronicle"))
                        .chain(valid.iter().cloned())
                        .chain([candidate.clone()]);
                    !matches!(
                        cmd.clone().try_get_matches_from(args).map_err(|e| e.kind()),
                        Err(clap::error::ErrorKind::ValueValidation
                            | clap::error::ErrorKind::InvalidValue)
                    )
                })
                .unwrap_or_else(|| OsString::from(ID)),
        };
        valid.push(value);
    }
    valid
}

/// One invocation of the no-panic test.
struct Case {
    args: Vec<OsString>,
    long_running: bool,
}

/// The invocations for one subcommand: an unknown flag; each garbage value
/// in every positional; each garbage value in each option (as
/// `--name=value`, so values that look like flags are values) with valid
/// positionals; every flag at once; a count flag given 300 times. Long-running
/// subcommands get an unknown flag last, so clap refuses every one of them
/// after parsing the rest.
fn cases(path: &[String], cmd: &clap::Command) -> Vec<Case> {
    let long_running = is_long_running(path);
    let base: Vec<OsString> = path.iter().map(OsString::from).collect();
    let positionals: Vec<&clap::Arg> = cmd.get_positionals().collect();
    let valid = valid_positionals(cmd);
    let mut lines: Vec<Vec<OsString>> =
        vec![[base.clone(), vec!["--no-such-flag".into()]].concat()];
    for value in garbage() {
        if !positionals.is_empty() {
            lines.push(
                base.iter()
                    .cloned()
                    .chain(positionals.iter().map(|_| value.clone()))
                    .collect(),
            );
        }
        for option in cmd.get_opts() {
            let Some(long) = option.get_long() else {
                continue;
            };
            let mut flag = OsString::from(format!("--{long}="));
            flag.push(&value);
            lines.push([base.clone(), valid.clone(), vec![flag]].concat());
        }
    }
    let flags: Vec<OsString> = cmd
        .get_arguments()
        .filter(|a| !a.get_action().takes_values() && !a.is_positional())
        .filter_map(|a| a.get_long())
        .filter(|l| !["help", "version", "quiet"].contains(l))
        .map(|l| OsString::from(format!("--{l}")))
        .collect();
    lines.push([base.clone(), valid.clone(), flags].concat());
    lines.push(
        [
            base.clone(),
            valid,
            vec![format!("-{}", "v".repeat(300)).into()],
        ]
        .concat(),
    );
    lines
        .into_iter()
        .map(|mut args| {
            if long_running {
                args.push("--no-such-flag".into());
            }
            Case { args, long_running }
        })
        .collect()
}

/// Runs one case with a deadline; the output, or None if it had to be
/// killed.
fn run_case(case: &Case, url: &str, dir: &Path) -> Option<Output> {
    let mut cmd = support::command(Some(url), &[]);
    cmd.args(&case.args)
        .env("CHRONICLE_HOME", dir.join("home"))
        .env("RUST_BACKTRACE", "1")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if case.long_running {
        // Should clap ever let one through, there is nothing to run on.
        cmd.env(
            "DATABASE_URL",
            "postgres://127.0.0.1:1/none?connect_timeout=2",
        );
    }
    let mut child = cmd.spawn().expect("run chronicle");
    let mut stderr = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Some(Output {
        status,
        stdout: Vec::new(),
        stderr: reader.join().expect("stderr reader"),
    })
}

#[test]
fn no_input_makes_a_command_panic() {
    let url = migrated();
    let dir = tempfile::tempdir().unwrap();
    let mut all: Vec<Case> = vec![
        Case {
            args: vec![],
            long_running: false,
        },
        Case {
            args: garbage(),
            long_running: false,
        },
    ];
    for (path, cmd) in leaves() {
        all.extend(cases(&path, &cmd));
    }
    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::<String>::new());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(case) = all.get(i) else { break };
                    let shown = format!("chronicle {:?}", case.args);
                    let problem = match run_case(case, &url, dir.path()) {
                        None => Some("did not finish within 60 s".to_owned()),
                        Some(out) => {
                            let stderr = text(&out.stderr);
                            let code = out.status.code();
                            if code == Some(101) || stderr.contains("panicked") {
                                Some(format!("panicked: {}", explain(&out)))
                            } else if code.is_none() {
                                Some(format!("killed by a signal: {:?}", out.status))
                            } else if case.long_running && code != Some(2) {
                                Some(format!("ran past clap: {}", explain(&out)))
                            } else {
                                None
                            }
                        }
                    };
                    if let Some(problem) = problem {
                        failures.lock().unwrap().push(format!("{shown}: {problem}"));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} command lines failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n\n")
    );
    eprintln!(
        "{} command lines, none panicked, in {:.1} s",
        all.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Appends one event with two encrypted fields through the library, as an
/// application would, so the key and audit commands have something to show.
fn append_encrypted(url: &str, keyring: &Path, aggregate: uuid::Uuid) {
    use chronicle_core::{EventAppender, ExpectedVersion, NewEvent};
    use chronicle_crypto::{AccessContext, EncryptionConfig, FieldEncryptorBuilder, LocalKeyring};
    use chronicle_postgres::{PgAuditSink, PgDataKeyStore, PgEventStore, PgOptions};

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let pool = PgOptions::from_url(url).unwrap().connect().await.unwrap();
        let crypto = FieldEncryptorBuilder::new(
            EncryptionConfig::from_yaml(
                "encryption:\n  events:\n    CustomerRegistered:\n      fields: [/email]\n",
            )
            .unwrap(),
            Arc::new(LocalKeyring::from_file(keyring).unwrap()),
            Arc::new(PgDataKeyStore::new(pool.clone())),
            Arc::new(PgAuditSink::new(pool.clone())),
        )
        .build();
        PgEventStore::new(pool)
            .encrypted(Arc::new(crypto), AccessContext::new("app", "signup"))
            .append(
                aggregate,
                "customer",
                ExpectedVersion::NoStream,
                vec![NewEvent::new(
                    "CustomerRegistered",
                    serde_json::json!({ "name": "Ada", "email": "ada@example.com" }),
                )],
            )
            .await
            .unwrap();
    });
}

#[test]
fn every_command_prints_json_objects() {
    let url = migrated();
    let dir = tempfile::tempdir().unwrap();
    let keyring = dir.path().join("keyring.yaml");
    chronicle_crypto::LocalKeyring::generate()
        .unwrap()
        .write_file(&keyring)
        .unwrap();
    let upcasters = dir.path().join("upcasters.yaml");
    std::fs::write(
        &upcasters,
        "upcasters:\n  - event_type: Renamed\n    from: 1\n    steps:\n      - add: { path: /source, default: cli }\n",
    )
    .unwrap();
    let customer_id = uuid::Uuid::now_v7();
    let customer = customer_id.to_string();
    let keyring = keyring.to_str().unwrap();
    let upcasters = upcasters.to_str().unwrap();
    let pages = dir.path().join("man");
    let pages = pages.to_str().unwrap();
    // A Cloudflare deployment whose plan can be printed (a bundle's files
    // are listed, not run), and a local one the provider commands refuse.
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle).unwrap();
    std::fs::write(bundle.join("index.js"), "export default {}").unwrap();
    std::fs::write(bundle.join("index_bg.wasm"), b"\0asm\x01\0\0\0").unwrap();
    let bundle = bundle.to_str().unwrap();
    let cloudflare = dir.path().join("cloudflare.yaml");
    std::fs::write(
        &cloudflare,
        "projections:\n  user-profile:\n    handler: user-profile\n    provider: cloudflare\n",
    )
    .unwrap();
    let cloudflare = cloudflare.to_str().unwrap();
    let local = dir.path().join("local.yaml");
    std::fs::write(
        &local,
        "projections:\n  user-profile:\n    handler: user-profile\n",
    )
    .unwrap();
    let local = local.to_str().unwrap();
    // A relay whose status can be read without its broker (status reads
    // the database only).
    let relay = dir.path().join("relay.yaml");
    std::fs::write(
        &relay,
        "relay:\n  brokers:\n    events:\n      backend: nats\n      url: nats://127.0.0.1:4222\n  \
         routes:\n    - broker: events\n      destination: orders\n",
    )
    .unwrap();
    let relay = relay.to_str().unwrap();
    let line = format!(
        r#"{{"aggregate_id":"{ID}","aggregate_type":"user","event_type":"Renamed","data":{{"name":"Grace"}}}}"#
    );

    // (command line, stdin, expected exit code), in an order that gives
    // each command something to show; the encrypted event is appended
    // between the two phases, after the projection has been rebuilt (its
    // handler refuses event types it does not know).
    type Run<'a> = (Vec<&'a str>, Option<&'a str>, i32);
    let before: Vec<Run> = vec![
        (vec!["migrate"], None, 0),
        (vec!["projections", "list"], None, 0),
        (vec!["projections", "rebuild", "user-profile"], None, 0),
        (vec!["projections", "status"], None, 0),
        (vec!["dlq", "list", "user-profile"], None, 0),
        (vec!["dlq", "show", "user-profile", ID], None, 4),
        // Nothing queued for that aggregate: not found, nothing on stdout.
        (vec!["dlq", "retry", "user-profile", ID], None, 4),
        (vec!["dlq", "discard", "user-profile", ID], None, 4),
        (vec!["monitor", "user-profile"], None, 0),
        (vec!["relay", "status", "--config", relay], None, 0),
        (
            vec!["deploy", "-c", cloudflare, "--bundle", bundle, "--dry-run"],
            None,
            0,
        ),
        // A local projection has no provider to scale or undeploy it.
        (vec!["scale", "user-profile", "2", "-c", local], None, 2),
        (vec!["undeploy", "user-profile", "-c", local], None, 2),
    ];
    let after: Vec<Run> = vec![
        (
            vec![
                "append",
                "--aggregate-id",
                ID,
                "--aggregate-type",
                "user",
                "--event-type",
                "Renamed",
                "--data",
                r#"{"name":"Ada"}"#,
            ],
            None,
            0,
        ),
        (vec!["append"], Some(line.as_str()), 0),
        (vec!["read", "stream", ID], None, 0),
        (vec!["read", "all"], None, 0),
        (vec!["read", "type", "Renamed"], None, 0),
        (vec!["state", ID], None, 0),
        (vec!["status"], None, 0),
        (vec!["upcast", "plan", "--config", upcasters], None, 0),
        (vec!["upcast", "run", "--config", upcasters], None, 0),
        (vec!["upcast", "status"], None, 0),
        (vec!["upcast", "verify", "--config", upcasters], None, 0),
        (vec!["upcast", "rollback", "--all"], None, 0),
        (vec!["keys", "list"], None, 0),
        (
            vec!["keys", "--keyring", keyring, "rotate", &customer],
            None,
            0,
        ),
        (vec!["keys", "--keyring", keyring, "rotate-kek"], None, 0),
        (vec!["keys", "shred", &customer, "--yes"], None, 0),
        (vec!["snapshots", "list"], None, 0),
        (
            vec!["snapshots", "list", "--aggregate-type", "customer"],
            None,
            0,
        ),
        (vec!["snapshots", "drop", ID], None, 4),
        (vec!["snapshots", "rebuild", ID], None, 4),
        (
            vec!["snapshots", "drop", "--aggregate-type", "customer"],
            None,
            0,
        ),
        (
            vec!["snapshots", "rebuild", "--aggregate-type", "customer"],
            None,
            0,
        ),
        (vec!["audit", "seal"], None, 0),
        (vec!["audit", "list"], None, 0),
        (vec!["audit", "verify"], None, 0),
        (vec!["dev", "status"], None, 0),
        (vec!["dev", "start"], None, 0),
        (vec!["dev", "stop"], None, 0),
        (vec!["dev", "reset"], None, 0),
        (vec!["completions", "bash"], None, 0),
        (vec!["man"], None, 0),
        (vec!["man", "--out-dir", pages], None, 0),
        // A walkthrough for people: refused rather than prose in JSON mode.
        (vec!["demo"], None, 2),
    ];
    // Not run here: they run for minutes or until Ctrl-C.
    let excused: &[&[&str]] = &[&["bench"], &["projections", "run"], &["relay", "run"]];

    for (phase, runs) in [&before, &after].into_iter().enumerate() {
        if phase == 1 {
            append_encrypted(&url, Path::new(keyring), customer_id);
        }
        for (args, stdin, code) in runs {
            let mut cmd = support::command(Some(&url), args);
            cmd.arg("--output")
                .arg("json")
                .env("CHRONICLE_HOME", dir.path().join("home"))
                .current_dir(dir.path());
            let out = support::run(cmd, *stdin);
            assert_eq!(
                out.status.code(),
                Some(*code),
                "{args:?} --output json\n{}",
                explain(&out)
            );
            let stdout = text(&out.stdout);
            for line in stdout.lines() {
                let value: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("{args:?} --output json printed a line that is not JSON ({e}): {line}")
                });
                assert!(
                    value.is_object(),
                    "{args:?} --output json printed a line that is not an object: {line}"
                );
            }
            // Lists that may be empty: the feed holds events back while an
            // older transaction anywhere on the (shared) server is open; the
            // CLI stores no snapshots (tests/cli.rs lists some).
            if *code == 0
                && !matches!(
                    args[..],
                    ["dlq", "list", ..] | ["read", "all"] | ["snapshots", "list", ..]
                )
            {
                assert!(
                    !stdout.trim().is_empty(),
                    "{args:?} --output json printed nothing"
                );
            }
        }
    }
    let runs: Vec<&Run> = before.iter().chain(&after).collect();
    for (path, _) in leaves() {
        // A run whose words hold the path's in order (`keys --keyring F
        // rotate S` runs `keys rotate`).
        let run = runs.iter().any(|(args, _, _)| {
            let mut words = args.iter();
            path.iter().all(|p| words.any(|w| w == p))
        });
        let excused = excused
            .iter()
            .any(|e| path.iter().zip(*e).all(|(a, b)| a == b) && path.len() >= e.len());
        assert!(
            run || excused,
            "`chronicle {}` is not exercised by this JSON test: add it to `runs` (or, if it runs \
             until stopped, to `excused`)",
            path.join(" ")
        );
    }
}

#[test]
fn every_command_has_help_with_an_example_and_takes_quiet_and_verbose() {
    let root = definition();
    let long_about = root
        .get_long_about()
        .map(ToString::to_string)
        .unwrap_or_default();
    for sub in root.get_subcommands().filter(|s| s.get_name() != "help") {
        assert!(
            long_about.contains(sub.get_name()),
            "`chronicle --help` does not describe `{}`: {long_about}",
            sub.get_name()
        );
    }
    let mut all = vec![(Vec::new(), root.clone())];
    all.extend(subcommands(&root));
    for (path, cmd) in &all {
        for help in [
            cmd.clone().render_help().to_string(),
            cmd.clone().render_long_help().to_string(),
        ] {
            let Some((_, examples)) = help.split_once("Examples:") else {
                panic!(
                    "`chronicle {} --help` has no Examples: {help}",
                    path.join(" ")
                );
            };
            // One example runs this very command: its words in order.
            let runs_it = examples.lines().any(|line| {
                let mut words = line.split_whitespace().skip_while(|w| *w != "chronicle");
                words.next().is_some() && path.iter().all(|p| words.any(|w| w == p))
            });
            assert!(
                runs_it,
                "no example of `chronicle {}` runs it: {examples}",
                path.join(" ")
            );
        }
        if !cmd.has_subcommands() || path.is_empty() {
            for flags in [&["--quiet"][..], &["-q"], &["--verbose"], &["-vv"]] {
                let args = std::iter::once("chronicle")
                    .chain(path.iter().map(String::as_str))
                    .chain(flags.iter().copied())
                    .chain(["--help"]);
                let err = chronicle_cli::Cli::try_parse_from(args.clone())
                    .expect_err("--help stops parsing");
                assert_eq!(
                    err.kind(),
                    clap::error::ErrorKind::DisplayHelp,
                    "{:?}: {err}",
                    args.collect::<Vec<_>>()
                );
            }
        }
        if !cmd.has_subcommands() {
            let both: Vec<String> = std::iter::once("chronicle".to_owned())
                .chain(path.iter().cloned())
                .chain(
                    valid_positionals(cmd)
                        .into_iter()
                        .map(|v| v.to_string_lossy().into_owned()),
                )
                .chain(["--quiet".to_owned(), "--verbose".to_owned()])
                .collect();
            let err = chronicle_cli::Cli::try_parse_from(&both).expect_err("both refused");
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{both:?}: {err}"
            );
        }
    }
}

/// `chronicle args` with no database anywhere: no DATABASE_URL, and a
/// CHRONICLE_HOME that must stay empty (no cluster started).
fn without_database(args: &[&str]) -> Output {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = support::command(None, args);
    cmd.env("CHRONICLE_HOME", home.path());
    let out = support::run(cmd, None);
    assert_eq!(
        std::fs::read_dir(home.path()).unwrap().count(),
        0,
        "{args:?} needs no database"
    );
    out
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let dir = tempfile::tempdir().unwrap();
    let top: Vec<String> = definition()
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();

    let bash = ok(&without_database(&["completions", "bash"]));
    let script = dir.path().join("chronicle.bash");
    std::fs::write(&script, &bash).unwrap();
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(syntax.status.success(), "bash -n: {}", explain(&syntax));
    for name in &top {
        assert!(bash.contains(name.as_str()), "bash completes `{name}`");
    }
    // Sourced, it completes subcommands as a shell would ask it to.
    let complete = |words: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                r#"source "$1"; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); COMP_LINE="{words}"; COMP_POINT=${{#COMP_LINE}}; _chronicle chronicle "${{COMP_WORDS[-1]}}" "${{COMP_WORDS[-2]}}"; printf '%s\n' "${{COMPREPLY[@]}}""#
            ))
            .arg("bash")
            .arg(&script)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", explain(&out));
        text(&out.stdout)
    };
    let offered = complete("chronicle proj");
    assert_eq!(offered.trim(), "projections", "{offered}");
    let offered = complete("chronicle read ''");
    for sub in ["stream", "all", "type"] {
        assert!(offered.lines().any(|l| l == sub), "{sub} in {offered}");
    }

    let zsh = ok(&without_database(&["completions", "zsh"]));
    assert!(zsh.starts_with("#compdef chronicle"), "{zsh}");
    let fish = ok(&without_database(&["completions", "fish"]));
    assert!(fish.contains("complete -c chronicle"), "{fish}");
    for name in &top {
        assert!(zsh.contains(name.as_str()), "zsh completes `{name}`");
        assert!(fish.contains(name.as_str()), "fish completes `{name}`");
    }

    let json = json_lines(&ok(&without_database(&[
        "completions",
        "fish",
        "--output",
        "json",
    ])));
    assert_eq!(json[0]["shell"], "fish");
    assert_eq!(json[0]["script"].as_str(), Some(fish.as_str()));

    let wrong = without_database(&["completions", "tcsh"]);
    assert_eq!(wrong.status.code(), Some(2), "{}", explain(&wrong));
}

/// `roff` rendered for a terminal by groff, or by man when groff is
/// missing; None when neither is installed.
fn render_man(page: &Path) -> Option<String> {
    // Plain text: no SGR codes, no overstriking.
    let groff = Command::new("groff")
        .args(["-man", "-Tutf8", "-P-cbou"])
        .arg(page)
        .output();
    let out = match groff {
        Ok(out) => out,
        Err(_) => Command::new("man")
            .arg("-l")
            .arg(page)
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .output()
            .ok()?,
    };
    assert!(out.status.success(), "{}", explain(&out));
    Some(text(&out.stdout))
}

#[test]
fn the_man_pages_render() {
    let dir = tempfile::tempdir().unwrap();
    let roff = ok(&without_database(&["man"]));
    for part in [
        ".TH chronicle 1",
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH SUBCOMMANDS",
    ] {
        assert!(roff.contains(part), "{part} in the page");
    }
    let top: Vec<String> = definition()
        .get_subcommands()
        .filter(|s| s.get_name() != "help")
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in &top {
        assert!(
            roff.contains(&format!("chronicle\\-{name}(1)")),
            "the page lists `{name}`"
        );
    }
    let page = dir.path().join("chronicle.1");
    std::fs::write(&page, &roff).unwrap();
    match render_man(&page) {
        Some(shown) => {
            for part in [
                "NAME",
                "SYNOPSIS",
                "SUBCOMMANDS",
                "projections",
                "Examples:",
            ] {
                assert!(shown.contains(part), "{part} in the rendered page: {shown}");
            }
        }
        None => eprintln!("neither groff nor man is installed: the roff structure was checked"),
    }

    // One page per subcommand, each rendering.
    let out_dir = dir.path().join("man1");
    let written = json_lines(&ok(&without_database(&[
        "man",
        "--out-dir",
        out_dir.to_str().unwrap(),
        "--output",
        "json",
    ])));
    let names: BTreeSet<String> = written
        .iter()
        .map(|w| w["page"].as_str().unwrap().to_owned())
        .collect();
    let mut expected: BTreeSet<String> = subcommands(&definition())
        .into_iter()
        .map(|(path, _)| format!("chronicle-{}.1", path.join("-")))
        .collect();
    expected.insert("chronicle.1".into());
    assert_eq!(names, expected);
    for w in &written {
        let path = Path::new(w["path"].as_str().unwrap());
        if let Some(shown) = render_man(path) {
            assert!(shown.contains("NAME"), "{}: {shown}", path.display());
        }
    }
}

/// Runs `command` (a shell command line) on a pseudo-terminal with
/// `script`, so standard error is a terminal; what the terminal showed.
fn on_a_terminal(command: &str, envs: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", command, "/dev/null"])
        .stdin(Stdio::null())
        .env_remove("NO_COLOR")
        .env_remove("CHRONICLE_LOG")
        .env_remove("DATABASE_URL");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("script (util-linux) is installed");
    assert!(out.status.success(), "{command}\n{}", explain(&out));
    text(&out.stdout)
}

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_chronicle")
}

#[test]
fn quiet_verbose_and_colours_are_the_same_on_every_command() {
    let url = migrated();
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = support::command(Some(&url), args);
        cmd.env_remove("CHRONICLE_LOG").env_remove("NO_COLOR");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = support::run(cmd, None);
        assert!(out.status.success(), "{args:?}\n{}", explain(&out));
        assert!(
            !out.stderr.contains(&0x1b),
            "{args:?}: no escape codes on a piped stderr: {}",
            text(&out.stderr)
        );
        text(&out.stderr)
    };
    // Informational lines go to stderr, unless --quiet.
    assert!(run(&["read", "all"], &[]).contains("next checkpoint"));
    assert_eq!(run(&["read", "all", "--quiet"], &[]), "");
    assert_eq!(run(&["-q", "read", "all"], &[]), "");
    assert!(run(&["projections", "list", "--output", "json"], &[]).is_empty());
    assert!(run(&["dlq", "list", "user-profile"], &[]).contains("dead-lettered"));
    assert_eq!(run(&["dlq", "list", "user-profile", "-q"], &[]), "");

    // Logging: warn by default, info with -v, debug with -vv, errors only
    // with -q; CHRONICLE_LOG wins.
    assert_eq!(run(&["status"], &[]), "");
    let info = run(&["status", "-v"], &[]);
    assert!(
        info.contains(" INFO ") && info.contains("database:"),
        "{info}"
    );
    assert!(!info.contains("DEBUG"), "{info}");
    let debug = run(&["status", "-vv"], &[]);
    assert!(debug.contains("DEBUG"), "{debug}");
    assert_eq!(run(&["status", "-q"], &[]), "");
    let env_wins = run(&["status", "-q"], &[("CHRONICLE_LOG", "debug")]);
    assert!(env_wins.contains("DEBUG"), "{env_wins}");
    // A CHRONICLE_LOG that does not parse is refused, not ignored.
    let mut bad = support::command(Some(&url), &["status"]);
    bad.env("CHRONICLE_LOG", "chronicle=[");
    let bad = support::run(bad, None);
    assert_eq!(bad.status.code(), Some(2), "{}", explain(&bad));
    let stderr = text(&bad.stderr);
    assert!(
        stderr.contains("CHRONICLE_LOG") && stderr.contains("not a log filter"),
        "{stderr}"
    );
    assert!(bad.stdout.is_empty(), "nothing ran");

    // Both at once is a usage error, on any command.
    let both = support::chronicle(Some(&url), &["read", "all", "-q", "-v"], None);
    assert_eq!(both.status.code(), Some(2), "{}", explain(&both));

    // On a terminal, logs are coloured unless NO_COLOR is set.
    let line = format!("{} status -v >/dev/null", binary());
    let coloured = on_a_terminal(&line, &[("DATABASE_URL", &url)]);
    assert!(
        coloured.contains("\x1b["),
        "colours on a terminal: {coloured:?}"
    );
    let plain = on_a_terminal(&line, &[("DATABASE_URL", &url), ("NO_COLOR", "1")]);
    assert!(plain.contains("database:"), "{plain:?}");
    assert!(!plain.contains('\x1b'), "NO_COLOR: {plain:?}");
}

#[test]
fn progress_bars_draw_only_on_a_terminal_and_never_under_quiet_or_json() {
    let url = migrated();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("upcasters.yaml");
    std::fs::write(
        &config,
        "upcasters:\n  - event_type: ItemAdded\n    from: 1\n    steps:\n      - add: { path: /qty, default: 1 }\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let items: String = (0..300)
        .map(|i| {
            format!(
                "{{\"aggregate_id\":\"{}\",\"aggregate_type\":\"cart\",\"event_type\":\"ItemAdded\",\"data\":{{\"n\":{i}}}}}\n",
                uuid::Uuid::now_v7()
            )
        })
        .collect();
    ok(&support::chronicle(Some(&url), &["append"], Some(&items)));
    let rollback = || {
        ok(&support::chronicle(
            Some(&url),
            &["upcast", "rollback", "--all"],
            None,
        ))
    };

    // Piped stderr: the notes, no bar.
    let out = support::chronicle(
        Some(&url),
        &["upcast", "run", "--config", config, "--batch-size", "10"],
        None,
    );
    let stderr = text(&ok_output(&out).stderr);
    assert!(stderr.contains("event(s) upcast"), "{stderr}");
    assert!(
        !has_bar_codes(&stderr),
        "no bar on a piped stderr: {stderr:?}"
    );
    rollback();

    // A terminal: the bar draws (and clears itself).
    let run = format!("{} upcast run --config {config} --batch-size 10", binary());
    let shown = on_a_terminal(&format!("{run} >/dev/null"), &[("DATABASE_URL", &url)]);
    assert!(shown.contains("events"), "a bar on a terminal: {shown:?}");
    assert!(has_bar_codes(&shown), "{shown:?}");
    rollback();
    // ... but not under --quiet, nor for JSON.
    for flags in ["--quiet", "--output json"] {
        let shown = on_a_terminal(
            &format!("{run} {flags} >/dev/null"),
            &[("DATABASE_URL", &url)],
        );
        assert!(!has_bar_codes(&shown), "{flags}: no bar: {shown:?}");
        rollback();
    }
}

/// Whether `text` holds what a progress bar draws with: escape codes, or a
/// carriage return that is not a terminal's line end.
fn has_bar_codes(text: &str) -> bool {
    text.contains('\x1b') || text.replace("\r\n", "\n").contains('\r')
}

fn ok_output(out: &Output) -> &Output {
    assert!(out.status.success(), "{}", explain(out));
    out
}
