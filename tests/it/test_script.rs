//! `scripts/test-postgres.sh`, the PostgreSQL discovery of `scripts/test.sh`, run as a
//! real process: with no server answering it starts a throwaway cluster the tests can use
//! and removes it afterwards; with no PostgreSQL installed it says so (and fails under CI).

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};

fn discovery_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test-postgres.sh")
}

/// Nothing listens on port 1 of the loopback interface.
const UNREACHABLE_URL: &str = "postgres://postgres@127.0.0.1:1/test";

/// The discovery, told to look for a server where none is, with the command below.
fn discovery(command: &str) -> Command {
    let mut process = Command::new("bash");
    process
        .arg(discovery_script())
        .args(["sh", "-c", command])
        .env("MORAG_TEST_POSTGRES_URL", UNREACHABLE_URL)
        .env_remove("MORAG_TEST_POSTGRES_SEARCH")
        .env_remove("CI");
    process
}

async fn connects(url: &str) -> Result<String, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT current_database()::text", &[])
        .await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn with_no_server_answering_the_discovery_runs_a_throwaway_cluster_and_removes_it() {
    // The command reports what it was given, then waits until the test has connected.
    let mut child = discovery(
        r#"echo "$TEST_POSTGRES_STATE"; echo "$MORAG_TEST_POSTGRES_URL"; echo "${MORAG_TEST_POSTGRES_DIR:-}"; read done"#,
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("bash runs the discovery");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || lines.next().expect("a line").expect("readable");
    let (state, url, dir) = (next(), next(), next());

    if state == "none" {
        // This machine has no PostgreSQL at all: the other test covers that path.
        drop(child.stdin.take());
        let output = child.wait_with_output().unwrap();
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but no PostgreSQL binaries exist: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        eprintln!(
            "!!! no PostgreSQL binaries on this machine: the throwaway cluster is not tested"
        );
        return;
    }
    assert_eq!(
        state, "own",
        "a cluster of its own, not the unreachable URL"
    );
    assert_ne!(url, UNREACHABLE_URL);
    assert!(std::path::Path::new(&dir).join("data").is_dir(), "{dir}");
    assert_eq!(
        connects(&url).await.expect("the throwaway cluster answers"),
        "test",
        "the cluster has the database the tests expect"
    );

    child.stdin.take().unwrap().write_all(b"done\n").unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("throwaway PostgreSQL removed"), "{stderr}");
    assert!(
        !std::path::Path::new(&dir).exists(),
        "the cluster's directory is removed"
    );
    assert!(
        connects(&url).await.is_err(),
        "the cluster is stopped: nothing answers at {url}"
    );
}

#[test]
fn without_postgresql_binaries_the_discovery_says_so_and_fails_under_ci() {
    let empty = tempfile::tempdir().unwrap();
    let search = empty.path().to_str().unwrap();
    // Under scripts/test.sh this names the outer run's throwaway cluster: the script must
    // leave a directory it did not create alone.
    let outer_cluster = tempfile::tempdir().unwrap();
    std::fs::write(outer_cluster.path().join("PG_VERSION"), b"15").unwrap();

    let output = discovery(r#"echo "state=$TEST_POSTGRES_STATE""#)
        .env("MORAG_TEST_POSTGRES_SEARCH", search)
        .env("MORAG_TEST_POSTGRES_DIR", outer_cluster.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "state=none");
    assert!(
        stderr.contains("no initdb/pg_ctl was found") && stderr.contains("!!!"),
        "loud: {stderr}"
    );
    assert!(
        outer_cluster.path().join("PG_VERSION").exists(),
        "an inherited cluster directory is not this run's to remove"
    );

    let output = discovery(r#"echo "the command ran""#)
        .env("MORAG_TEST_POSTGRES_SEARCH", search)
        .env("CI", "true")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "CI fails without PostgreSQL");
    assert!(stderr.contains("CI is set"), "{stderr}");
    assert!(output.stdout.is_empty(), "the command is not run");
}
