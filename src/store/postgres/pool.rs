//! A minimal connection pool: idle connections in a stack, a semaphore for the size
//! limit, and a per-connection cache of prepared statements.
//!
//! It exists for one property more than for speed: a broken connection is never handed
//! out again. A connection goes back to the pool only when its operation finished and
//! the connection is still open; one whose operation was abandoned (a timeout, a dropped
//! request) or that failed with a connection error is dropped, and the next checkout
//! opens a fresh one. So when the database comes back after an outage, the server does
//! too, without a restart.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Client, NoTls, Statement};

use super::pg_error;
use crate::store::StoreError;

/// One open connection and the statements prepared on it.
pub struct Conn {
    pub client: Client,
    statements: HashMap<String, Statement>,
}

impl Conn {
    /// The prepared statement for `sql`, preparing it on first use on this connection.
    pub async fn statement(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await.map_err(pg_error)?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// Runs `sql` (prepared once per connection), which must return one row, and returns
    /// that row's first column.
    pub async fn query_value<T>(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<T, StoreError>
    where
        T: for<'a> FromSql<'a>,
    {
        let statement = self.statement(sql).await?;
        let row = self
            .client
            .query_one(&statement, params)
            .await
            .map_err(pg_error)?;
        row.try_get(0).map_err(pg_error)
    }
}

pub struct Pool {
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
    /// How long a caller waits for a free connection before the store answers `Unavailable`.
    checkout_timeout: Duration,
    closed: AtomicBool,
    /// The runtime the pool was made on: every connection is opened and driven there,
    /// whichever runtime asks for it (the dispatcher runs on a runtime of its own, which
    /// stops before the store closes; a connection bound to it would die with it).
    runtime: tokio::runtime::Handle,
}

impl Pool {
    pub fn new(
        config: tokio_postgres::Config,
        max_size: usize,
        checkout_timeout: Duration,
    ) -> Pool {
        Pool {
            config,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max_size.max(1)),
            checkout_timeout,
            closed: AtomicBool::new(false),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// An idle open connection, or a new one.
    pub async fn get(&self) -> Result<PooledConn<'_>, StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("the store is closed".into()));
        }
        let permit = tokio::time::timeout(self.checkout_timeout, self.permits.acquire())
            .await
            .map_err(|_| StoreError::Unavailable("no database connection free in time".into()))?
            .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
        loop {
            let candidate = self.idle.lock().expect("pool lock").pop();
            match candidate {
                Some(conn) if !conn.client.is_closed() => {
                    return Ok(PooledConn {
                        conn: Some(conn),
                        pool: self,
                        finished: false,
                        _permit: permit,
                    })
                }
                Some(_broken) => continue,
                None => break,
            }
        }
        let config = self.config.clone();
        let conn = self
            .runtime
            .spawn(async move { connect(&config).await })
            .await
            .map_err(|error| {
                StoreError::Unavailable(format!("cannot connect to PostgreSQL: {error}"))
            })??;
        Ok(PooledConn {
            conn: Some(conn),
            pool: self,
            finished: false,
            _permit: permit,
        })
    }

    /// Drops every idle connection; later checkouts answer `Unavailable`.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.permits.close();
        self.idle.lock().expect("pool lock").clear();
    }
}

/// Opens a connection and drives it on its own task.
pub async fn connect(config: &tokio_postgres::Config) -> Result<Conn, StoreError> {
    let (client, connection) = config.connect(NoTls).await.map_err(|error| {
        StoreError::Unavailable(format!("cannot connect to PostgreSQL: {error}"))
    })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "postgres connection ended");
        }
    });
    Ok(Conn {
        client,
        statements: HashMap::new(),
    })
}

/// A checked-out connection. Goes back to the pool on drop only if `finish(true)` was
/// called and the connection is still open.
pub struct PooledConn<'a> {
    conn: Option<Conn>,
    pool: &'a Pool,
    finished: bool,
    _permit: SemaphorePermit<'a>,
}

impl PooledConn<'_> {
    pub fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("connection present until drop")
    }

    /// Marks the operation as done; `reusable` is false after a connection error.
    pub fn finish(&mut self, reusable: bool) {
        self.finished = reusable;
    }
}

impl Drop for PooledConn<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if self.finished && !conn.client.is_closed() && !self.pool.closed.load(Ordering::SeqCst) {
            self.pool.idle.lock().expect("pool lock").push(conn);
        }
    }
}
