//! Wiring: `App::build(config, clock)` opens the store and binds the listener;
//! `App::run(shutdown)` serves HTTP and runs the monitor until `shutdown` resolves, then
//! lets in-flight requests finish and closes the store.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::config::{Config, DatabaseTarget};
use crate::delivery::dispatcher::Dispatcher;
use crate::monitor::Monitor;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::{SqliteOptions, SqliteStore};
use crate::store::Store;
use crate::wakeups::Wakeups;

/// What every request handler and background service shares.
pub struct AppContext {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub clock: SharedClock,
    /// Wakes long-polling workers when a job may have become claimable.
    pub wakeups: Wakeups,
    /// Becomes true when the server is shutting down; long polls return early.
    pub shutting_down: watch::Receiver<bool>,
    /// Delivers job outcomes to the configured sinks (runs in the background; tests and
    /// cleanup also call it directly).
    pub dispatcher: Arc<Dispatcher>,
}

pub struct App {
    context: Arc<AppContext>,
    listener: TcpListener,
    shutdown_sender: watch::Sender<bool>,
}

impl App {
    pub async fn build(config: Config, clock: SharedClock) -> anyhow::Result<App> {
        let store = open_store(&config).await?;
        let listener = TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("failed to listen on {}", config.addr))?;
        let (shutdown_sender, shutting_down) = watch::channel(false);
        let sinks = crate::delivery::configured_sinks(&config.delivery, clock.clone());
        let dispatcher = Arc::new(Dispatcher::new(
            store.clone(),
            clock.clone(),
            &config.delivery,
            sinks,
        ));
        if !config.delivery.has_global_sink() {
            tracing::warn!(
                "no ingestion sink is configured (MORAG_INGESTION_CALLBACK_URL): job outcomes are only \
                 stored, except for jobs whose task_options name a webhook_url"
            );
        }
        let context = Arc::new(AppContext {
            config,
            store,
            clock,
            wakeups: Wakeups::default(),
            shutting_down,
            dispatcher,
        });
        Ok(App {
            context,
            listener,
            shutdown_sender,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn context(&self) -> Arc<AppContext> {
        self.context.clone()
    }

    /// Serves until `shutdown` resolves. In-flight requests finish, long polls return
    /// empty, the monitor stops between batches, and the store is closed last.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let App {
            context,
            listener,
            shutdown_sender,
        } = self;
        let router = crate::api::router(context.clone());
        let monitor = Monitor::new(context.clone());
        let mut monitor_shutdown = context.shutting_down.clone();
        let monitor_task = tokio::spawn(async move { monitor.run(&mut monitor_shutdown).await });
        let dispatcher = context.dispatcher.clone();
        let mut dispatcher_shutdown = context.shutting_down.clone();
        let dispatcher_task =
            tokio::spawn(async move { dispatcher.run(&mut dispatcher_shutdown).await });

        let shutdown_sender = Arc::new(shutdown_sender);
        let trigger_sender = shutdown_sender.clone();
        let trigger = tokio::spawn(async move {
            shutdown.await;
            let _ = trigger_sender.send(true);
        });
        let wakeups = tokio::spawn(forward_wakeups(context.clone()));
        let mut server_shutdown = context.shutting_down.clone();
        tracing::info!(addr = %listener.local_addr()?, open = context.config.is_open(), "morag-jobs listening");
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = server_shutdown.wait_for(|stop| *stop).await;
            })
            .await;
        // However the server stopped, everything else stops with it.
        trigger.abort();
        let _ = shutdown_sender.send(true);
        let monitor_result = monitor_task.await;
        let dispatcher_result = dispatcher_task.await;
        wakeups.abort();
        context
            .store
            .close()
            .await
            .context("failed to close the store")?;
        served.context("the HTTP server failed")?;
        monitor_result.context("the monitor task panicked")?;
        dispatcher_result.context("the dispatcher task panicked")?;
        tracing::info!("morag-jobs stopped");
        Ok(())
    }
}

/// Opens the configured store, running its migrations. A database whose schema is newer
/// than this program is refused (`StoreError::SchemaTooNew`).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    match &config.database {
        DatabaseTarget::Sqlite(path) => {
            let store = SqliteStore::open(SqliteOptions {
                path: path.clone(),
                durability: config.durability,
            })
            .with_context(|| format!("failed to open the SQLite store at {path:?}"))?;
            Ok(Arc::new(store))
        }
        DatabaseTarget::Postgres(url) => {
            let store = PostgresStore::open(crate::config::postgres_options(
                url,
                config.database_max_connections,
            ))
            .await
            .context("failed to open the PostgreSQL store")?;
            Ok(Arc::new(store))
        }
    }
}

/// Wakes this replica's long-polling workers when the store reports that a job may have
/// become claimable elsewhere (another replica, or the fallback tick). Stops when the
/// store closes its event source or the server shuts down.
async fn forward_wakeups(context: Arc<AppContext>) {
    let Some(mut events) = context.store.jobs_available_events() else {
        return;
    };
    let mut shutting_down = context.shutting_down.clone();
    loop {
        tokio::select! {
            changed = events.changed() => {
                if changed.is_err() {
                    return;
                }
                context.wakeups.wake_everyone();
            }
            _ = shutting_down.wait_for(|stop| *stop) => return,
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => tracing::info!("SIGINT received, shutting down"),
        _ = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}
