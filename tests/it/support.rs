//! `spawn_app()`: the real server on a loopback port with a temporary data directory and a
//! manual clock, plus helpers that speak the wire protocol.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use morag_jobs::app::App;
use morag_jobs::clock::ManualClock;
use morag_jobs::config::{Config, ServeArgs};
use morag_jobs::context::AppContext;
use morag_jobs::monitor::Monitor;
use serde_json::{json, Value};
use tokio::sync::oneshot;

pub struct TestApp {
    pub base: String,
    pub clock: ManualClock,
    pub context: Arc<AppContext>,
    pub files_dir: PathBuf,
    pub client: reqwest::Client,
    /// Sent with every request when set.
    pub api_key: Option<String>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Keeps the temporary data directory until the app is dropped.
    _data_dir: tempfile::TempDir,
    /// The PostgreSQL database of a run with `MORAG_TEST_STORE=postgres`.
    _database: Option<PgDatabase>,
}

/// Flags as `morag-jobs serve` would parse them, with a temp data dir and port 0.
pub fn serve_args(data_dir: &std::path::Path, extra: &[&str]) -> ServeArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let mut argv = vec![
        "morag-jobs",
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
    ];
    argv.extend_from_slice(extra);
    Wrapper::try_parse_from(argv)
        .expect("test flags parse")
        .serve
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Starts the server with extra `serve` flags, e.g. `["--max-retries", "1"]`.
///
/// With `MORAG_TEST_STORE=postgres`, every server whose flags name no database runs on a
/// fresh PostgreSQL database instead of SQLite, so the whole HTTP suite can be run against
/// that backend too.
pub async fn spawn_app_with(extra: &[&str]) -> TestApp {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut database = None;
    let mut flags: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    if std::env::var("MORAG_TEST_STORE").as_deref() == Ok("postgres")
        && !extra.contains(&"--database-url")
    {
        let created = PgDatabase::create().await;
        flags.extend(["--database-url".to_owned(), created.url.clone()]);
        database = Some(created);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let config = Config::from_args(serve_args(data_dir.path(), &flags)).expect("valid config");
    let clock = ManualClock::starting_now();
    let app = App::build(config, Arc::new(clock.clone()))
        .await
        .expect("app builds");
    let base = format!("http://{}", app.local_addr());
    let context = app.context();
    let (shutdown, stop) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run(async move {
        let _ = stop.await;
    }));
    TestApp {
        base,
        clock,
        files_dir: context.config.files_dir.clone(),
        context,
        client: reqwest::Client::new(),
        api_key: None,
        shutdown: Some(shutdown),
        server: Some(server),
        _data_dir: data_dir,
        _database: database,
    }
}

impl TestApp {
    /// The PostgreSQL database of a run with `MORAG_TEST_STORE=postgres`.
    pub fn postgres(&self) -> Option<&PgDatabase> {
        self._database.as_ref()
    }

    pub fn monitor(&self) -> Monitor {
        morag_jobs::app::monitor_for(&self.context)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends a request and returns the status and the JSON body (Null when not JSON).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.client.request(method, self.url(path));
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request reaches the server");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    /// Writes a source file into the server's files directory and returns its path.
    pub fn source_file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.files_dir.join(name);
        std::fs::write(&path, bytes).expect("write source file");
        path.to_string_lossy().into_owned()
    }

    /// Creates a job of `content_type` and returns its id.
    pub async fn create(&self, content_type: &str) -> String {
        let path = self.source_file(&format!("{}.bin", uuid_like()), b"source bytes");
        let (status, body) = self
            .post(
                "/api/v1/remote-jobs/",
                json!({"source_file_path": path, "content_type": content_type, "task_options": {"lang": "en"}, "ingestion_task_id": "ingest-1"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "pending");
        body["job_id"].as_str().expect("job_id").to_owned()
    }

    /// Polls once for `content_types`; returns the poll body (null fields when none).
    pub async fn poll(&self, worker: &str, content_types: &str) -> Value {
        let (status, body) =
            self.get(&format!("/api/v1/remote-jobs/poll?worker_id={worker}&content_types={content_types}&max_jobs=1")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls and expects a job; returns (job_id, lease_id).
    pub async fn claim(&self, worker: &str, content_types: &str) -> (String, String) {
        let body = self.poll(worker, content_types).await;
        let id = body["job_id"]
            .as_str()
            .unwrap_or_else(|| panic!("expected a job, got {body}"))
            .to_owned();
        (id, body["lease_id"].as_str().expect("lease_id").to_owned())
    }

    pub async fn heartbeat(&self, id: &str, lease: &str) -> (u16, Value) {
        self.post(
            &format!("/api/v1/remote-jobs/{id}/heartbeat"),
            json!({"lease_id": lease, "progress": 10}),
        )
        .await
    }

    pub async fn succeed(&self, id: &str, lease: Option<&str>) -> (u16, Value) {
        let mut body = json!({"success": true, "content": "converted text", "metadata": {"pages": 1}, "processing_time": 0.5});
        if let Some(lease) = lease {
            body["lease_id"] = json!(lease);
        }
        self.put(&format!("/api/v1/remote-jobs/{id}/result"), body)
            .await
    }

    pub async fn fail(&self, id: &str, lease: Option<&str>, retryable: bool) -> (u16, Value) {
        let mut body =
            json!({"success": false, "error_message": "converter crashed", "retryable": retryable});
        if let Some(lease) = lease {
            body["lease_id"] = json!(lease);
        }
        self.put(&format!("/api/v1/remote-jobs/{id}/result"), body)
            .await
    }

    pub async fn status_of(&self, id: &str) -> String {
        let (status, body) = self.get(&format!("/api/v1/remote-jobs/{id}/status")).await;
        assert_eq!(status, 200, "{body}");
        body["status"].as_str().unwrap().to_owned()
    }

    pub async fn detail(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/v1/remote-jobs/{id}")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The (from, to, actor) triples of a job's history.
    pub async fn history(&self, id: &str) -> Vec<(String, String, String)> {
        self.detail(id).await["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["from"].as_str().unwrap_or("-").to_owned(),
                    e["to"].as_str().unwrap().to_owned(),
                    e["actor"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    pub fn advance(&self, secs: u64) {
        self.clock.advance(Duration::from_secs(secs));
    }

    /// Stops the server the way SIGTERM does and waits for it.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server stops cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

pub fn uuid_like() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// The `(from, to, actor)` triple, for comparing histories.
pub fn step(from: &str, to: &str, actor: &str) -> (String, String, String) {
    (from.to_owned(), to.to_owned(), actor.to_owned())
}

/// The PostgreSQL server tests run against: `MORAG_TEST_POSTGRES_URL`, or the local
/// server (trust auth, database `test`). Tests that need it fail when it is unreachable.
pub fn pg_admin_url() -> String {
    std::env::var("MORAG_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn pg_admin() -> tokio_postgres::Client {
    let url = pg_admin_url();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|error| {
            panic!("PostgreSQL at {url} is unreachable (the tests need it): {error}")
        });
    tokio::spawn(connection);
    client
}

/// A freshly created, empty database, dropped (WITH (FORCE)) when this is dropped.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        let name = format!("morag_jobs_test_{:016x}", fastrand::u64(..));
        pg_admin()
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let admin_url = pg_admin_url();
        let base = admin_url
            .rsplit_once('/')
            .expect("the URL names a database")
            .0;
        PgDatabase {
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// Runs SQL on the server's `test` database (for pg_terminate_backend and the like).
    pub async fn admin_execute(&self, sql: &str) {
        pg_admin()
            .await
            .batch_execute(sql)
            .await
            .expect("admin SQL runs");
    }

    /// Runs SQL in this test's database.
    pub async fn admin_execute_in_own_database(&self, sql: &str) {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        client.batch_execute(sql).await.expect("SQL runs");
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop runs inside the test's runtime, which must not be blocked on: use a thread
        // with its own small runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async { pg_admin().await.batch_execute(&sql).await })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

/// The real `morag-jobs serve` binary as a child process, for crash and CLI tests.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub base: String,
}

impl ServerProcess {
    pub fn start(data_dir: &std::path::Path, port: u16, env: &[(&str, &str)]) -> ServerProcess {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_morag-jobs"))
            .args([
                "serve",
                "--addr",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
                data_dir.to_str().unwrap(),
            ])
            // These tests are about the embedded store whatever the developer exported.
            .env_remove("MORAG_DATABASE_URL")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("server binary starts");
        ServerProcess {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    pub async fn wait_healthy(&self, client: &reqwest::Client) {
        let started = std::time::Instant::now();
        loop {
            if let Ok(response) = client.get(format!("{}/health", self.base)).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "server did not become healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no chance to flush or close anything.
    pub fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix.
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success());
        self.child.wait().unwrap()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
/// Creates a document job on a running server at `base` with the `create` body, claims it
/// as worker `w` and submits `result` with the claim's lease, asserting each answer; returns
/// the job's id. For tests that drive a real server process with a plain HTTP client.
pub async fn complete_document_job(
    client: &reqwest::Client,
    base: &str,
    create: Value,
    mut result: Value,
) -> String {
    let created: Value = client
        .post(format!("{base}/api/v1/remote-jobs/"))
        .json(&create)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["job_id"].as_str().unwrap().to_owned();
    let polled = get_json(
        client,
        format!("{base}/api/v1/remote-jobs/poll?worker_id=w&content_types=document"),
    )
    .await;
    assert_eq!(polled["job_id"].as_str(), Some(id.as_str()));
    result["lease_id"] = polled["lease_id"].clone();
    let answer = client
        .put(format!("{base}/api/v1/remote-jobs/{id}/result"))
        .json(&result)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    id
}

/// GETs `url` with a plain client and reads the answer as JSON (panicking on any failure).
pub async fn get_json(client: &reqwest::Client, url: impl reqwest::IntoUrl) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
