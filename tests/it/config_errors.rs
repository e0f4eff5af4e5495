//! `morag-jobs serve` as a new user meets it: each configuration mistake is refused with
//! the variable or flag that was set, its value and the expected form; humane values
//! are accepted; the port and data directory are checked before anything is created.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::free_port;

/// `morag-jobs serve` with only the given variables (none inherited from the developer).
fn serve(env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_morag-jobs"));
    command
        .arg("serve")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied());
    command
}

/// Runs a `serve` that must refuse to start; returns its stderr.
fn refused(env: &[(&str, &str)], args: &[&str]) -> String {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().join("data");
    let mut all_args = Vec::new();
    if !args.contains(&"--data-dir") {
        all_args.extend(["--data-dir", data_dir.to_str().unwrap()]);
    }
    all_args.extend_from_slice(args);
    let output: Output = serve(env, &all_args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "must refuse: {stderr}");
    stderr
}

fn check(env: &[(&str, &str)], args: &[&str], expected: &str) {
    let stderr = refused(env, args);
    assert!(
        stderr.contains(expected),
        "expected {expected:?} in:\n{stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line, no usage dump:\n{stderr}"
    );
}

#[test]
fn a_bad_value_names_the_variable_or_flag_that_was_set_the_value_and_the_expected_form() {
    check(
        &[("MORAG_REMOTE_MAX_RETRIES", "abc")],
        &[],
        "MORAG_REMOTE_MAX_RETRIES=abc: expected a whole number, e.g. 3",
    );
    check(
        &[],
        &["--max-retries", "abc"],
        "--max-retries abc: expected a whole number, e.g. 3",
    );
    check(
        &[("MORAG_JOB_MONITOR_INTERVAL", "1.5")],
        &[],
        "MORAG_JOB_MONITOR_INTERVAL=1.5: expected whole seconds or a duration, e.g. 90, 90s, 5m or 1h",
    );
    check(
        &[("MORAG_REMOTE_HEARTBEAT_TIMEOUT", "soon")],
        &[],
        "MORAG_REMOTE_HEARTBEAT_TIMEOUT=soon: expected whole seconds or a duration",
    );
    check(
        &[("MORAG_JOB_RETENTION_DAYS", "1w")],
        &[],
        "MORAG_JOB_RETENTION_DAYS=1w: expected a whole number of days, e.g. 7",
    );
    check(
        &[("MORAG_JOBS_ADDR", "localhost")],
        &[],
        "MORAG_JOBS_ADDR=localhost: no port: expected HOST:PORT, e.g. 127.0.0.1:8700, localhost:8700",
    );
    check(
        &[("MORAG_JOBS_ADDR", "no-such-host.invalid:8700")],
        &[],
        "MORAG_JOBS_ADDR=no-such-host.invalid:8700: cannot resolve \"no-such-host.invalid\"",
    );
    check(
        &[("MORAG_JOBS_SQLITE_SYNC", "always")],
        &[],
        "MORAG_JOBS_SQLITE_SYNC=always: expected normal or full",
    );
    check(
        &[("MORAG_REMOTE_JOB_TIMEOUT_AUDIO", "0")],
        &[],
        "MORAG_REMOTE_JOB_TIMEOUT_AUDIO (or --timeout-audio) is 0: expected at least 1 second",
    );
    check(
        &[("MORAG_WEBHOOK_CA_FILE", "/proc/version")],
        &[],
        "MORAG_WEBHOOK_CA_FILE \"/proc/version\": it holds no PEM certificate",
    );
    // A flag given on the command line wins over the variable, and is the one named.
    check(
        &[("MORAG_REMOTE_MAX_RETRIES", "5")],
        &["--max-retries=ten"],
        "--max-retries ten: expected a whole number",
    );
}

#[test]
fn a_data_directory_that_cannot_be_used_is_reported_with_its_cause_once() {
    let stderr = refused(&[], &["--data-dir", "/proc/morag-jobs-test"]);
    assert!(
        stderr.contains("cannot create the data directory")
            && stderr.contains("MORAG_JOBS_DATA_DIR")
            && stderr.contains("/proc/morag-jobs-test"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("os error").count(),
        1,
        "the cause once: {stderr}"
    );

    let file = tempfile::NamedTempFile::new().unwrap();
    let stderr = refused(&[], &["--data-dir", file.path().to_str().unwrap()]);
    assert!(stderr.contains("exists but is not a directory"), "{stderr}");
}

#[test]
fn a_port_in_use_is_reported_before_anything_is_created_and_suggests_addr() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let parent = tempfile::tempdir().unwrap();
    let data_dir = parent.path().join("data");
    let output = serve(
        &[("MORAG_JOBS_ADDR", &addr)],
        &["--data-dir", data_dir.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr}"))
            && stderr.contains("already in use")
            && stderr.contains("--addr or MORAG_JOBS_ADDR"),
        "{stderr}"
    );
    assert!(!data_dir.exists(), "nothing created when the port is taken");
}

/// A server that must start: returns its stderr after it answered /health and was stopped.
fn started(env: &[(&str, &str)], health_url: &str) -> String {
    let data = tempfile::tempdir().unwrap();
    let log = data.path().join("stderr.log");
    let mut child = serve(
        env,
        &["--data-dir", data.path().join("data").to_str().unwrap()],
    )
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .unwrap();
    let started = Instant::now();
    let healthy = loop {
        if answers_ok(health_url) {
            break true;
        }
        if started.elapsed() > Duration::from_secs(20) || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(healthy, "server did not start:\n{stderr}");
    stderr
}

/// True when `url` answers 200 (reqwest has no blocking feature here: a small runtime).
fn answers_ok(url: &str) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        matches!(reqwest::get(url).await, Ok(response) if response.status() == 200)
    })
}

#[test]
fn humane_durations_host_names_and_the_insecure_variable_are_accepted() {
    let port = free_port();
    let stderr = started(
        &[
            ("MORAG_JOBS_ADDR", &format!("localhost:{port}")),
            ("MORAG_JOB_MONITOR_INTERVAL", "5m"),
            ("MORAG_REMOTE_HEARTBEAT_TIMEOUT", "90s"),
            ("MORAG_REMOTE_JOB_TIMEOUT_VIDEO", "1h"),
            ("MORAG_ADMIN_API_KEYS", "admin"),
            ("MORAG_WORKER_API_KEYS", "worker"),
            // Outcomes go somewhere (nothing is delivered in this test).
            (
                "MORAG_INGESTION_CALLBACK_URL",
                "http://127.0.0.1:9/callback",
            ),
        ],
        &format!("http://localhost:{port}/health"),
    );
    let summary = stderr
        .lines()
        .find(|line| line.contains("morag-jobs starting"))
        .unwrap_or_else(|| panic!("a startup summary:\n{stderr}"));
    for field in [
        "version=",
        "store=\"sqlite ",
        "data_dir=",
        "allowed_roots=",
        "auth=\"API keys (1 worker, 1 admin)\"",
        "monitor_interval=5m",
        "sinks=\"ingestion_callback, webhook (per job)\"",
    ] {
        assert!(summary.contains(field), "{field} in {summary}");
    }
    assert!(
        !stderr.contains("WARN"),
        "fully configured: no warning\n{stderr}"
    );

    let port = free_port();
    let refused_without = refused(&[("MORAG_JOBS_ADDR", &format!("0.0.0.0:{port}"))], &[]);
    assert!(
        refused_without.contains("--insecure-no-auth"),
        "{refused_without}"
    );
    started(
        &[
            ("MORAG_JOBS_ADDR", &format!("0.0.0.0:{port}")),
            ("MORAG_JOBS_INSECURE_NO_AUTH", "true"),
        ],
        &format!("http://127.0.0.1:{port}/health"),
    );
}

#[test]
fn keys_for_one_side_only_are_warned_about_at_startup() {
    let port = free_port();
    let stderr = started(
        &[
            ("MORAG_JOBS_ADDR", &format!("127.0.0.1:{port}")),
            ("MORAG_WORKER_API_KEYS", "worker"),
        ],
        &format!("http://127.0.0.1:{port}/health"),
    );
    assert!(
        stderr.contains("WARN")
            && stderr.contains("MORAG_WORKER_API_KEYS is set but MORAG_ADMIN_API_KEYS is not"),
        "{stderr}"
    );
    let port = free_port();
    let stderr = started(
        &[
            ("MORAG_JOBS_ADDR", &format!("127.0.0.1:{port}")),
            ("MORAG_ADMIN_API_KEYS", "admin"),
        ],
        &format!("http://127.0.0.1:{port}/health"),
    );
    assert!(
        stderr.contains("MORAG_ADMIN_API_KEYS is set but MORAG_WORKER_API_KEYS is not"),
        "{stderr}"
    );
}
