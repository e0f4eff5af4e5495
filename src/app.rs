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
use crate::config::Config;
use crate::context::AppContext;
use crate::delivery::dispatcher::Dispatcher;
use crate::monitor::{Cleaner, Monitor, MonitorSettings};
use crate::registry::WorkerRegistry;
use crate::wakeups::Wakeups;

pub struct App {
    context: Arc<AppContext>,
    listener: TcpListener,
    shutdown_sender: watch::Sender<bool>,
}

impl App {
    pub async fn build(config: Config, clock: SharedClock) -> anyhow::Result<App> {
        let store = crate::store::open(&config.database, &config.store_settings)
            .await
            .with_context(|| format!("failed to open the store ({:?})", config.database))?;
        let listener = TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("failed to listen on {}", config.addr))?;
        let (shutdown_sender, shutting_down) = watch::channel(false);
        let config_long_polls = config.limits.max_long_polls;
        let sinks = crate::delivery::configured_sinks(&config.delivery, clock.clone());
        let dispatcher = Arc::new(Dispatcher::new(
            store.clone(),
            clock.clone(),
            &config.delivery,
            sinks,
        ));
        if !config.delivery.has_global_sink() {
            tracing::warn!(
                "no ingestion sink is configured (MORAG_INGESTION_CALLBACK_URL, MORAG_CELERY_BROKER_URL): job outcomes are only \
                 stored, except for jobs whose task_options name a webhook_url"
            );
        }
        let context = Arc::new(AppContext {
            config,
            store,
            clock,
            wakeups: Arc::new(Wakeups::default()),
            shutting_down,
            long_poll_slots: tokio::sync::Semaphore::new(config_long_polls),
            write_probe: std::sync::Mutex::new(None),
            dispatcher,
            worker_registry: Arc::new(WorkerRegistry::default()),
            cleanup_progress: Arc::default(),
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
        let limits = context.config.limits.clone();
        let monitor = monitor_for(&context);
        let mut monitor_shutdown = context.shutting_down.clone();
        let monitor_task = tokio::spawn(async move { monitor.run(&mut monitor_shutdown).await });
        let dispatcher_thread = crate::delivery::dispatcher::run_on_own_thread(
            context.dispatcher.clone(),
            context.shutting_down.clone(),
        )
        .context("failed to start the dispatcher thread")?;

        let registry = context.worker_registry.clone();
        let registry_store = context.store.clone();
        let mut registry_shutdown = context.shutting_down.clone();
        let registry_task =
            tokio::spawn(async move { registry.run(registry_store, &mut registry_shutdown).await });

        let shutdown_sender = Arc::new(shutdown_sender);
        let trigger_sender = shutdown_sender.clone();
        let trigger = tokio::spawn(async move {
            shutdown.await;
            let _ = trigger_sender.send(true);
        });
        let wakeups = tokio::spawn(forward_wakeups(context.clone()));
        crate::http_server::serve(listener, router, limits, context.shutting_down.clone()).await;
        // However the server stopped, everything else stops with it.
        trigger.abort();
        let _ = shutdown_sender.send(true);
        let monitor_result = monitor_task.await;
        let dispatcher_result = dispatcher_thread.await;
        wakeups.abort();
        let registry_result = registry_task.await;
        // Requests that finished after the flusher's last pass noted activity too.
        if let Err(error) = context.worker_registry.flush(context.store.as_ref()).await {
            tracing::warn!(%error, "cannot write the worker registry at shutdown");
        }
        context
            .store
            .close()
            .await
            .context("failed to close the store")?;
        monitor_result.context("the monitor task panicked")?;
        dispatcher_result.context("the dispatcher task panicked")?;
        registry_result.context("the worker registry task panicked")?;
        tracing::info!("morag-jobs stopped");
        Ok(())
    }
}

/// The monitor with the parts of the context it uses.
pub fn monitor_for(context: &AppContext) -> Monitor {
    let config = &context.config;
    Monitor::new(
        context.store.clone(),
        context.clock.clone(),
        context.wakeups.clone(),
        Cleaner::new(
            context.store.clone(),
            context.clock.clone(),
            config.files_dir.clone(),
        )
        .fanning_out_first(context.dispatcher.clone())
        .reporting_to(context.cleanup_progress.clone()),
        MonitorSettings {
            policy: config.policy.clone(),
            monitor_interval: config.monitor_interval,
            cleanup_interval: config.cleanup_interval,
            stats_log_interval: config.stats_log_interval,
            worker_retention: config.worker_retention,
        },
    )
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
