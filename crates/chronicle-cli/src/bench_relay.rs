//! `chronicle bench relay`: the relay (chronicle-relay, run by the
//! projection runtime as `chronicle relay run` runs it) draining the
//! store's events to a broker, against that broker's own client library
//! publishing the same messages as fast as it naturally goes, with
//! publisher acknowledgements, in one run (a scratch schema and scratch
//! streams/queues, removed afterwards).
//!
//! - Relay side: from the runner's start until every event is checkpointed
//!   (the relay returns a batch only once the broker acknowledged it).
//! - Raw side: the very messages the relay's queue sends (body, message
//!   id, attributes; the same subject per aggregate on NATS, the same lane
//!   queues on RabbitMQ), serialized beforehand, all published pipelined
//!   and every acknowledgement awaited at the end: `async-nats` JetStream
//!   publish futures, `lapin` publisher confirms.
//!
//! Both sides' rows are the messages found on their destination afterwards.
//!
//! A first case runs the relay to a queue that serializes each message as
//! the broker queues do and acknowledges at once: the store, the runtime
//! and the relay alone, the ceiling any broker case can reach (its raw
//! side is the first broker's).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use async_trait::async_trait;
use chronicle_core::{
    BoxError, Delivery, EventEnvelope, Message, MessageQueue, Metadata, Position, QueueDepth,
    Receipt,
};
use chronicle_postgres::PgPool;
use chronicle_projections::{PgProjection, Runner, RunnerOptions, load_state};
use chronicle_relay::{Relay, RelayConfig, Route};
use clap::Args;
use serde_json::json;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::Database;
use crate::bench::{Case, Scratch, Side, write_report};
use crate::commands::{UsageError, at_least_one};
use crate::output::OutputFormat;

/// Events per aggregate in the loaded store.
const PER_AGGREGATE: usize = 10;

/// `chronicle bench relay` arguments.
#[derive(Debug, Args)]
pub struct RelayBenchArgs {
    /// Events relayed per broker (10 per aggregate), and messages
    /// published on the raw side.
    #[arg(long, default_value_t = 20_000, value_parser = at_least_one)]
    events: usize,
    /// Bytes of padding in each event's data (the message body is the
    /// whole envelope as JSON, about 330 bytes more).
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    /// The brokers to measure, comma-separated (each needs its cargo
    /// feature compiled in).
    #[arg(long, value_delimiter = ',', default_value = "nats,rabbitmq")]
    brokers: Vec<String>,
    /// The relay's partitions (as `relay.partitions`).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    partitions: u32,
    /// The relay's events per step and publish (as `relay.batch_size`).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=50_000))]
    batch_size: u32,
    /// The NATS server (JetStream on).
    #[arg(
        long,
        env = "CHRONICLE_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats_url: String,
    /// The RabbitMQ broker.
    #[arg(
        long,
        env = "CHRONICLE_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
}

/// The brokers this bench knows, with the cargo feature each needs and
/// whether it is compiled in.
const BROKERS: &[(&str, &str, bool)] = &[
    ("nats", "nats", cfg!(feature = "nats")),
    ("rabbitmq", "rabbitmq", cfg!(feature = "rabbitmq")),
];

/// Runs `chronicle bench relay`.
pub async fn relay(db: &Database, args: RelayBenchArgs, format: OutputFormat) -> Result<()> {
    let mut brokers = Vec::new();
    for b in &args.brokers {
        let b = b.trim();
        match BROKERS.iter().find(|(name, _, _)| *name == b) {
            Some((_, _, true)) => {
                if !brokers.contains(&b) {
                    brokers.push(b);
                }
            }
            Some((name, feature, false)) => bail!(UsageError(format!(
                "--brokers: `{name}` is not compiled into this chronicle; build it with the cargo \
                 feature `{feature}` (or `brokers`), e.g. `cargo install --path crates/chronicle-cli \
                 --features {feature}`"
            ))),
            None => bail!(UsageError(format!(
                "--brokers: `{b}` is not a broker this benchmark measures (nats, rabbitmq; sqs, \
                 kafka and pubsub are not measured yet)"
            ))),
        }
    }
    if brokers.is_empty() {
        bail!(UsageError("--brokers names no broker".into()));
    }
    let scratch = Scratch::create(db).await?;
    let result = cases(&scratch, &args, &brokers, format).await;
    scratch.drop_schema().await?;
    let cases = result?;
    write_report("relay", &cases, format)?;
    Ok(())
}

async fn cases(
    scratch: &Scratch,
    args: &RelayBenchArgs,
    brokers: &[&str],
    format: OutputFormat,
) -> Result<Vec<Case>> {
    let progress = crate::ui::spinner(format);
    progress.enable_steady_tick(Duration::from_millis(200));
    let pool = scratch.pool(true, args.partitions as usize + 4, None)?;
    let aggregates = args.events.div_ceil(PER_AGGREGATE);
    let n = args.events as u64;
    progress.set_message(format!("loading {n} events over {aggregates} aggregates"));
    load(&pool, args.events, args.payload_bytes).await?;
    let messages = raw_messages(args.events, args.payload_bytes);
    let body_bytes = messages
        .iter()
        .map(|m| serde_json::to_vec(&m.payload).map_or(0, |b| b.len()))
        .sum::<usize>()
        / messages.len();
    progress.set_message(format!("the relay draining {n} events to no broker"));
    let null = Arc::new(NullQueue::default());
    let ceiling = relay_side(&pool, "none", null, args, n).await?;
    let mut cases = Vec::new();
    for &broker in brokers {
        let tag = format!("bench-relay-{}-{broker}", std::process::id());
        progress.set_message(format!("{broker}: the relay draining {n} events"));
        let queue = open(broker, args, &tag).await?;
        let ours = relay_side(&pool, broker, queue.clone(), args, n).await;
        let raw_tag = format!("{tag}-raw");
        progress.set_message(format!("{broker}: raw publish of {n} messages"));
        let raw = match ours {
            Ok(_) => raw_side(broker, args, &raw_tag, &messages).await,
            Err(_) => Ok(Side::default()),
        };
        drop(queue);
        progress.set_message(format!("{broker}: removing the bench's destinations"));
        let cleaned = cleanup(broker, args, &[&tag, &raw_tag]).await;
        let (ours, raw) = (ours?, raw?);
        cleaned?;
        if cases.is_empty() {
            cases.push(Case::new(
                format!(
                    "ceiling: relay of {n} events ({} partitions, batch {}) to a queue that \
                     serializes and acknowledges at once (no broker), vs raw {broker} below",
                    args.partitions, args.batch_size
                ),
                ceiling,
                raw,
                None,
            )?);
        }
        let what = match broker {
            "nats" => {
                "JetStream publish futures pipelined, every ack awaited (async-nats), one subject per aggregate"
            }
            _ => {
                "lapin, publisher confirms, all in flight, every confirm awaited, the same 16 lane queues"
            }
        };
        cases.push(Case::new(
            format!(
                "{broker}: relay of {n} events ({} partitions, batch {}), ~{body_bytes}-byte bodies, vs raw {what}",
                args.partitions, args.batch_size
            ),
            ours,
            raw,
            None,
        )?);
    }
    progress.finish_and_clear();
    Ok(cases)
}

/// `events` events, [`PER_AGGREGATE`] per aggregate, interleaved in the
/// feed (version 1 of every aggregate first, then version 2, …).
async fn load(pool: &PgPool, events: usize, payload_bytes: usize) -> Result<()> {
    let client = pool.get().await?;
    client
        .execute_typed(
            "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, event_data, metadata, version)
             SELECT gen_random_uuid(), a.id, 'account', 'Deposited',
                    jsonb_build_object('n', v, 'pad', repeat('x', $3::int)),
                    '{\"schema_version\": 1}', v
               FROM (SELECT gen_random_uuid() AS id, n FROM generate_series(1, $1::bigint) AS n) a,
                    generate_series(1, $2::int) AS v
              WHERE (a.n - 1) * $2::int + v <= $4::bigint
              ORDER BY v",
            &[
                (&(events.div_ceil(PER_AGGREGATE) as i64), Type::INT8),
                (&(PER_AGGREGATE as i32), Type::INT4),
                (&(payload_bytes as i32), Type::INT4),
                (&(events as i64), Type::INT8),
            ],
        )
        .await?;
    client.batch_execute("VACUUM ANALYZE events").await?;
    let loaded = crate::bench::count_events(pool).await?;
    anyhow::ensure!(
        loaded == events as u64,
        "loaded {loaded} of {events} events"
    );
    Ok(())
}

/// The messages the relay makes of events shaped like the loaded ones (the
/// raw side's, serialized before its clock starts).
fn raw_messages(events: usize, payload_bytes: usize) -> Vec<Message> {
    let route = Route::new("bench", "bench");
    let aggregates: Vec<Uuid> = (0..events.div_ceil(PER_AGGREGATE))
        .map(|_| Uuid::new_v4())
        .collect();
    let pad = "x".repeat(payload_bytes);
    (0..events)
        .map(|i| {
            let version = (i / aggregates.len()) as u32 + 1;
            let event = EventEnvelope {
                event_id: Uuid::new_v4(),
                aggregate_id: aggregates[i % aggregates.len()],
                aggregate_type: "account".into(),
                event_type: "Deposited".into(),
                event_data: json!({ "n": version, "pad": pad }),
                metadata: Metadata::default(),
                version,
                timestamp: chrono::Utc::now(),
                encrypted_fields: vec![],
                position: Position::new(1_000_000 + i as u64, 1_000_000 + i as i64),
            };
            route.message(&event)
        })
        .collect()
}

/// The relay's queue on `broker`, named `name`.
#[cfg_attr(
    not(all(feature = "nats", feature = "rabbitmq")),
    allow(unused_variables, unreachable_code)
)]
async fn open(broker: &str, args: &RelayBenchArgs, name: &str) -> Result<Arc<dyn MessageQueue>> {
    Ok(match broker {
        #[cfg(feature = "nats")]
        "nats" => Arc::new(
            chronicle_nats::NatsQueue::connect(
                &chronicle_nats::NatsOptions::new(args.nats_url.clone()),
                name,
            )
            .await?,
        ),
        #[cfg(feature = "rabbitmq")]
        "rabbitmq" => Arc::new(
            chronicle_rabbitmq::RabbitQueue::connect(
                &chronicle_rabbitmq::RabbitOptions::new(args.amqp_url.clone()),
                name,
            )
            .await?,
        ),
        other => bail!("`{other}` is not compiled in"),
    })
}

/// Runs the relay to `queue` from the start of the feed until all `n`
/// events are checkpointed; the rows are the messages on the queue.
async fn relay_side(
    pool: &PgPool,
    broker: &str,
    queue: Arc<dyn MessageQueue>,
    args: &RelayBenchArgs,
    n: u64,
) -> Result<Side> {
    let name = format!("bench-relay-{broker}");
    let relay = Relay::builder(name.clone())
        .route(Route::new(broker, queue.name().to_owned()), queue.clone())
        .build()?;
    let config = RelayConfig {
        name: name.clone(),
        partitions: args.partitions,
        batch_size: args.batch_size,
        ..RelayConfig::default()
    };
    let projection = Arc::new(PgProjection::new(
        pool.clone(),
        relay,
        config.projection_options(),
    )?);
    projection.register().await?;
    let started = Instant::now();
    let runner = Runner::start(
        projection,
        RunnerOptions {
            poll_interval: Duration::from_millis(5),
            ..RunnerOptions::default()
        },
    )
    .await?;
    let deadline = Duration::from_secs(600);
    let outcome = loop {
        let state = load_state(pool, Some(&name)).await?;
        let handled: u64 = state.iter().map(|s| s.events_processed).sum();
        if handled >= n {
            break Ok(started.elapsed().as_secs_f64());
        }
        if let Some(error) = state.iter().find_map(|s| s.last_error.clone()) {
            break Err(anyhow::anyhow!(
                "{broker}: the relay failed to publish: {error}"
            ));
        }
        if started.elapsed() > deadline {
            break Err(anyhow::anyhow!(
                "{broker}: the relay handled {handled} of {n} events in {deadline:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    runner.stop().await;
    let secs = outcome?;
    let depth = queue.depth().await.map_err(anyhow::Error::from_boxed)?;
    Ok(Side::new(n as f64 / secs, depth.messages))
}

#[cfg_attr(
    not(all(feature = "nats", feature = "rabbitmq")),
    allow(unused_variables, unreachable_code)
)]
async fn raw_side(
    broker: &str,
    args: &RelayBenchArgs,
    name: &str,
    messages: &[Message],
) -> Result<Side> {
    match broker {
        #[cfg(feature = "nats")]
        "nats" => raw_nats(&args.nats_url, name, messages).await,
        #[cfg(feature = "rabbitmq")]
        "rabbitmq" => raw_rabbit(&args.amqp_url, name, messages).await,
        other => bail!("`{other}` is not compiled in"),
    }
}

/// A JetStream stream configured as `NatsQueue` configures its own, the
/// same messages to the same subjects, all publishes sent before any ack
/// is awaited.
#[cfg(feature = "nats")]
async fn raw_nats(url: &str, name: &str, messages: &[Message]) -> Result<Side> {
    use async_nats::HeaderMap;
    use async_nats::jetstream::{self, stream};
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let stream_name = format!("CHRONICLE_{name}");
    js.get_or_create_stream(stream::Config {
        name: stream_name.clone(),
        subjects: vec![format!("chronicle.{name}.*")],
        retention: stream::RetentionPolicy::WorkQueue,
        duplicate_window: Duration::from_secs(120),
        allow_direct: true,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("NATS: create the raw stream: {e}"))?;
    let prepared: Vec<(String, HeaderMap, bytes::Bytes)> = messages
        .iter()
        .map(|m| {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", m.id.as_str());
            headers.insert(
                chronicle_nats::ATTRIBUTES_HEADER,
                serde_json::to_string(&m.attributes)?.as_str(),
            );
            Ok((
                format!("chronicle.{name}.{}", m.group),
                headers,
                serde_json::to_vec(&m.payload)?.into(),
            ))
        })
        .collect::<Result<_>>()?;
    let started = Instant::now();
    // The client holds at most 5,000 acks in flight (a publish beyond
    // waits for one to be awaited): keep 4,096 in flight, awaiting the
    // oldest before sending more.
    let mut acks = std::collections::VecDeque::with_capacity(4096);
    for (subject, headers, body) in prepared {
        if acks.len() >= 4096
            && let Some(ack) = acks.pop_front()
        {
            let ack: async_nats::jetstream::context::PublishAckFuture = ack;
            ack.await
                .map_err(|e| anyhow::anyhow!("NATS publish ack: {e}"))?;
        }
        acks.push_back(
            js.publish_with_headers(subject, headers, body)
                .await
                .map_err(|e| anyhow::anyhow!("NATS publish: {e}"))?,
        );
    }
    for ack in acks {
        ack.await
            .map_err(|e| anyhow::anyhow!("NATS publish ack: {e}"))?;
    }
    let secs = started.elapsed().as_secs_f64();
    let mut stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|e| anyhow::anyhow!("NATS: read the raw stream: {e}"))?;
    let info = stream
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("NATS: read the raw stream: {e}"))?;
    Ok(Side::new(messages.len() as f64 / secs, info.state.messages))
}

/// The lanes `RabbitQueue` declares (16 durable classic queues with single
/// active consumer), the same messages and properties to the same lane,
/// on one channel with publisher confirms, every confirm awaited at the
/// end.
#[cfg(feature = "rabbitmq")]
async fn raw_rabbit(url: &str, name: &str, messages: &[Message]) -> Result<Side> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
    use lapin::{BasicProperties, Connection, ConnectionProperties};
    const LANES: u16 = 16;
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    for lane in 0..LANES {
        let mut queue_args = FieldTable::default();
        queue_args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        channel
            .queue_declare(
                format!("chronicle.{name}.{lane}").as_str().into(),
                QueueDeclareOptions::durable(),
                queue_args,
            )
            .await?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let now = chrono::Utc::now().timestamp() as u64;
    let prepared: Vec<(String, BasicProperties, Vec<u8>)> = messages
        .iter()
        .map(|m| {
            let mut headers = FieldTable::default();
            headers.insert(
                chronicle_rabbitmq::GROUP_HEADER.into(),
                AMQPValue::LongString(LongString::from(m.group.as_bytes().to_vec())),
            );
            headers.insert(
                chronicle_rabbitmq::ATTRIBUTES_HEADER.into(),
                AMQPValue::LongString(LongString::from(serde_json::to_vec(&m.attributes)?)),
            );
            let properties = BasicProperties::default()
                .with_message_id(m.id.as_str().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_timestamp(now)
                .with_headers(headers);
            let lane = chronicle_rabbitmq::lane_of(&m.group, LANES);
            Ok((
                format!("chronicle.{name}.{lane}"),
                properties,
                serde_json::to_vec(&m.payload)?,
            ))
        })
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let mut confirms = Vec::with_capacity(prepared.len());
    for (queue, properties, body) in &prepared {
        confirms.push(
            channel
                .basic_publish(
                    ShortString::from(""),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    properties.clone(),
                )
                .await?,
        );
    }
    for confirm in confirms {
        anyhow::ensure!(confirm.await?.is_ack(), "RabbitMQ nacked a raw publish");
    }
    let secs = started.elapsed().as_secs_f64();
    let mut rows = 0u64;
    for lane in 0..LANES {
        let q = channel
            .queue_declare(
                format!("chronicle.{name}.{lane}").as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        rows += u64::from(q.message_count());
    }
    let _ = connection.close(200, "done".into()).await;
    Ok(Side::new(messages.len() as f64 / secs, rows))
}

/// Removes the streams (NATS) or lane queues (RabbitMQ) named `names`.
#[cfg_attr(
    not(all(feature = "nats", feature = "rabbitmq")),
    allow(unused_variables, unreachable_code)
)]
async fn cleanup(broker: &str, args: &RelayBenchArgs, names: &[&str]) -> Result<()> {
    match broker {
        #[cfg(feature = "nats")]
        "nats" => {
            let js = async_nats::jetstream::new(async_nats::connect(args.nats_url.as_str()).await?);
            for name in names {
                // A stream the run never got to create is not an error.
                let _ = js.delete_stream(format!("CHRONICLE_{name}")).await;
            }
            Ok(())
        }
        #[cfg(feature = "rabbitmq")]
        "rabbitmq" => {
            use lapin::options::QueueDeleteOptions;
            let connection =
                lapin::Connection::connect(&args.amqp_url, lapin::ConnectionProperties::default())
                    .await?;
            // Deleting a queue that does not exist is not an error.
            let channel = connection.create_channel().await?;
            for name in names {
                for lane in 0..16 {
                    channel
                        .queue_delete(
                            format!("chronicle.{name}.{lane}").as_str().into(),
                            QueueDeleteOptions::default(),
                        )
                        .await?;
                }
            }
            let _ = channel.close(200, "done".into()).await;
            let _ = connection.close(200, "done".into()).await;
            Ok(())
        }
        other => bail!("`{other}` is not compiled in"),
    }
}

/// A queue that serializes each message as the broker queues do (body
/// and attributes to JSON) and acknowledges at once, counting them.
#[derive(Default)]
struct NullQueue {
    published: AtomicU64,
}

#[async_trait]
impl MessageQueue for NullQueue {
    fn name(&self) -> &str {
        "none"
    }

    async fn publish(&self, messages: &[Message]) -> Result<(), BoxError> {
        for m in messages {
            std::hint::black_box(serde_json::to_vec(&m.payload)?);
            std::hint::black_box(serde_json::to_string(&m.attributes)?);
        }
        self.published
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn receive(&self, _: usize) -> Result<Vec<Delivery>, BoxError> {
        Ok(Vec::new())
    }

    async fn ack(&self, _: &[Receipt]) -> Result<(), BoxError> {
        Ok(())
    }

    async fn nack(&self, _: &[Receipt]) -> Result<(), BoxError> {
        Ok(())
    }

    async fn depth(&self) -> Result<QueueDepth, BoxError> {
        Ok(QueueDepth {
            messages: self.published.load(Ordering::Relaxed),
            ..QueueDepth::default()
        })
    }
}
