//! [`Listener`]: `LISTEN` on a dedicated connection, as a wake-up hint.
//!
//! Notifications are hints, never the truth: a reader that wakes on one
//! still reads the feed from its checkpoint, and a reader that misses one
//! (a dropped connection, a transaction-mode pooler that does not carry
//! `LISTEN`) still polls. The listener reconnects on its own, and wakes its
//! waiters after each reconnection, since notifications sent while it was
//! away are lost.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};
use tokio_postgres::{AsyncMessage, Client, Config, Connection};

use crate::connect::Tls;
use crate::{Error, PgOptions, Result};

/// The channel the events table's trigger notifies after each append
/// statement once enabled (migration 8 installs it disabled: `ALTER TABLE
/// events ENABLE TRIGGER chronicle_events_notify`; see docs/architecture.md,
/// "Live tailing").
pub const EVENTS_CHANNEL: &str = "chronicle_events";

/// Wake-ups from `LISTEN` on one channel. Clones share the connection;
/// each clone waits on its own.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use chronicle_postgres::{EVENTS_CHANNEL, PgOptions};
///
/// let options = PgOptions::from_url("postgres://localhost/app")?;
/// let mut listener = options.listen(EVENTS_CHANNEL).await?;
/// // Poll the feed, then sleep until an append (or at most a second).
/// let _ = tokio::time::timeout(std::time::Duration::from_secs(1), listener.notified()).await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Listener {
    wakeups: watch::Receiver<u64>,
}

impl Listener {
    /// Waits for the next notification on the channel (or the next
    /// reconnection of the listening connection). Returns at once for one
    /// that arrived since the last call.
    pub async fn notified(&mut self) {
        if self.wakeups.changed().await.is_err() {
            // The listening task is gone (the runtime is shutting down):
            // callers fall back to their poll interval.
            std::future::pending::<()>().await;
        }
    }
}

impl PgOptions {
    /// Opens a dedicated connection (not from the pool) that `LISTEN`s on
    /// `channel`, and keeps it open, reconnecting with backoff, while a
    /// clone of the returned [`Listener`] lives.
    ///
    /// Fails when the first connection or the `LISTEN` fails, or when
    /// `channel` is not a plain identifier. Point it at the database
    /// directly: a transaction-mode pooler does not deliver notifications
    /// (polling still works through it).
    pub async fn listen(&self, channel: &str) -> Result<Listener> {
        if !crate::sql::is_plain_identifier(channel, 63) {
            return Err(Error::Config(format!(
                "`{channel}` is not a channel name: use lowercase letters, digits and _"
            )));
        }
        let (tx, wakeups) = watch::channel(0u64);
        let (ready, first) = oneshot::channel();
        tokio::spawn(listen_loop(
            self.config().clone(),
            self.tls()?,
            channel.to_owned(),
            tx,
            ready,
        ));
        match first.await {
            Ok(Ok(())) => Ok(Listener { wakeups }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Connect(
                "the listening task ended before it connected".to_owned(),
            )),
        }
    }
}

async fn listen_loop(
    config: Config,
    tls: Tls,
    channel: String,
    tx: watch::Sender<u64>,
    ready: oneshot::Sender<Result<()>>,
) {
    let mut ready = Some(ready);
    let mut delay = Duration::from_millis(100);
    loop {
        let ended = match &tls {
            Tls::None => match config.connect(tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    session(client, connection, &channel, &tx, &mut ready).await
                }
                Err(e) => Err(e),
            },
            Tls::Rustls(make) => match config.connect(make.clone()).await {
                Ok((client, connection)) => {
                    session(client, connection, &channel, &tx, &mut ready).await
                }
                Err(e) => Err(e),
            },
        };
        match ended {
            // Every listener is gone.
            Ok(true) => return,
            Ok(false) => delay = Duration::from_millis(100),
            Err(e) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Err(Error::Connect(format!(
                        "cannot LISTEN on `{channel}`: {}; check the listening URL (behind a \
                         transaction-mode pooler, give the database's direct URL: LISTEN needs \
                         its own session), or run without it and rely on polling",
                        crate::error::describe(&e)
                    ))));
                    return;
                }
                tracing::warn!(error = %crate::error::describe(&e), retry_in = ?delay, "listening connection lost; polling until it is back");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(crate::backoff::jitter(delay)) => {}
            _ = tx.closed() => return,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Drives one connection: `LISTEN`, then forward notifications. `Ok(true)`
/// when every listener is gone, `Ok(false)` when the server closed the
/// connection.
async fn session<S, T>(
    client: Client,
    mut connection: Connection<S, T>,
    channel: &str,
    tx: &watch::Sender<u64>,
    ready: &mut Option<oneshot::Sender<Result<()>>>,
) -> std::result::Result<bool, tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    T: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {channel}");
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            done = &mut listen, if !listening => {
                done?;
                listening = true;
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Ok(()));
                }
                // Anything appended while no one listened: look now.
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    tx.send_modify(|n| *n = n.wrapping_add(1));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(false),
            },
            _ = tx.closed() => return Ok(true),
        }
    }
}
