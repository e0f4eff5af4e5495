//! Wake-ups across replicas: for each channel (claimable jobs, committed hand-offs) one
//! connection LISTENs for the other replicas' announcements (optionally ticking as a
//! fallback), and announcements are sent after commits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::{AsyncMessage, NoTls};

use super::pg_error;
use super::pool::Pool;

/// The channel long-polling replicas listen on (see the migration's `jobs_available` trigger).
pub(super) const JOBS_AVAILABLE_CHANNEL: &str = "morag_jobs_available";
/// Keeps one connection LISTENing on `channel` and turns the other replicas'
/// notifications (and, with `fallback`, a periodic tick) into changes of `events`.
/// Reconnects after a second when the connection is lost.
pub(super) async fn listen_for_wakeups(
    config: tokio_postgres::Config,
    channel: &'static str,
    fallback: Option<Duration>,
    replica_id: String,
    events: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        match listen_once(&config, channel, fallback, &replica_id, &events, &mut stop).await {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!(%error, channel, "lost a PostgreSQL LISTEN connection; reconnecting")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Returns `Ok` when told to stop, `Err` when the connection failed.
async fn listen_once(
    config: &tokio_postgres::Config,
    channel: &str,
    fallback: Option<Duration>,
    replica_id: &str,
    events: &watch::Sender<u64>,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let (client, mut connection) = config.connect(NoTls).await.map_err(|e| e.to_string())?;
    let (notified, mut notifications) = tokio::sync::mpsc::unbounded_channel::<()>();
    // The connection must be polled by hand to see its notifications.
    let own_id = replica_id.to_owned();
    let driver = tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            match message {
                // This replica already woke its own waiters.
                Ok(AsyncMessage::Notification(note)) if note.payload() == own_id => {}
                Ok(AsyncMessage::Notification(_)) => {
                    if notified.send(()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "wake-up listener connection failed");
                    break;
                }
            }
        }
    });
    let outcome = async {
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .await
            .map_err(|e| e.to_string())?;
        // Notifications sent while we were not listening are lost: look once now.
        events.send_modify(|n| *n += 1);
        // Without a fallback the tick branch is off (the interval is never polled).
        let mut tick = tokio::time::interval(fallback.unwrap_or(Duration::from_secs(3600)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                received = notifications.recv() => match received {
                    Some(()) => {
                        while notifications.try_recv().is_ok() {}
                        events.send_modify(|n| *n += 1);
                    }
                    None => return Err("the listener connection closed".to_owned()),
                },
                _ = tick.tick(), if fallback.is_some() => {
                    if client.is_closed() {
                        return Err("the listener connection closed".to_owned());
                    }
                    events.send_modify(|n| *n += 1);
                }
                _ = stop.changed() => return Ok(()),
            }
        }
    }
    .await;
    driver.abort();
    outcome
}

/// Sends one NOTIFY per burst of announcements, after the announcing writes committed.
/// A NOTIFY inside the job's own transaction would hold PostgreSQL's database-wide notify
/// lock until that transaction's commit was flushed, serializing all creates; a NOTIFY
/// alone writes no WAL, so the lock is held only briefly. Announcements made while one
/// is being sent are folded into the next one.
pub(super) async fn announce_wakeups(
    pool: Arc<Pool>,
    channel: &'static str,
    replica_id: String,
    announce: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = announce.notified() => {}
            _ = stop.changed() => return,
        }
        let sent = async {
            let mut pooled = pool.get().await?;
            let conn = pooled.conn();
            let statement = conn.statement("SELECT pg_notify($1, $2)").await?;
            let result = conn
                .client
                .execute(&statement, &[&channel, &replica_id])
                .await
                .map_err(pg_error);
            pooled.finish(result.is_ok());
            result
        };
        match tokio::time::timeout(Duration::from_secs(5), sent).await {
            Ok(Ok(_)) => {}
            // The other replicas' fallbacks (a tick, the dispatcher's poll) cover a lost
            // announcement.
            Ok(Err(error)) => tracing::debug!(%error, channel, "cannot announce"),
            Err(_) => tracing::debug!(channel, "announcing timed out"),
        }
    }
}
