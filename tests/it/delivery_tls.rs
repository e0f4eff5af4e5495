//! https webhooks and callbacks against a real TLS receiver: Python's `ssl` module serving
//! a certificate issued by a certificate authority that `openssl` makes for this test. The
//! server trusts that authority through `--webhook-ca-file` (MORAG_WEBHOOK_CA_FILE) and
//! delivers, signed as over http; a server without the setting refuses the receiver's
//! certificate and keeps the delivery pending.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use serde_json::{json, Value};

use crate::delivery::{
    create_and_claim, deliveries_of, signature_verifies, wait_until_settled, Received, SECRET,
};
use crate::support::{spawn_app_with, TestApp};

/// The receiver: answers every POST with 200 and appends one JSON line per request.
const RECEIVER_PY: &str = r#"
import http.server, json, ssl, sys

record_path, certificate, key = sys.argv[1:4]

class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        line = json.dumps({
            "path": self.path,
            "webhook_id": self.headers.get("webhook-id", ""),
            "timestamp": self.headers.get("webhook-timestamp", ""),
            "signature": self.headers.get("webhook-signature", ""),
            "body": body.decode("utf-8"),
        })
        with open(record_path, "a", encoding="utf-8") as record:
            record.write(line + "\n")
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(certificate, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

struct TlsReceiver {
    child: Child,
    port: u16,
    record: PathBuf,
    /// The certificate authority's certificate (PEM), for `--webhook-ca-file`.
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsReceiver {
    /// Makes a CA and a server certificate for `localhost` and `127.0.0.1` signed by it,
    /// and starts the receiver with them.
    fn start() -> TlsReceiver {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]);
        ca.extend(["-subj", "/CN=morag-jobs test CA"]);
        openssl(path, &ca);
        let mut request = vec!["req"];
        request.extend(ec);
        request.extend(["-keyout", "server.key", "-out", "server.csr"]);
        request.extend(["-subj", "/CN=localhost"]);
        openssl(path, &request);
        std::fs::write(
            path.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             extendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            path,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        );
        std::fs::write(path.join("receiver.py"), RECEIVER_PY).unwrap();
        let record = path.join("received.jsonl");
        let mut child = Command::new("python3")
            .arg(path.join("receiver.py"))
            .arg(&record)
            .arg(path.join("server.pem"))
            .arg(path.join("server.key"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the receiver prints its port");
        TlsReceiver {
            child,
            port,
            record,
            ca_file: path.join("ca.pem"),
            _dir: dir,
        }
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port)
    }

    fn received(&self, path: &str) -> Vec<Received> {
        let text = std::fs::read_to_string(&self.record).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|r| r["path"] == path)
            .map(|r| {
                let raw = Bytes::from(r["body"].as_str().unwrap().to_owned());
                Received {
                    path: path.to_owned(),
                    webhook_id: r["webhook_id"].as_str().unwrap().to_owned(),
                    timestamp: r["timestamp"].as_str().unwrap().to_owned(),
                    signature: r["signature"].as_str().unwrap().to_owned(),
                    body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
                    raw,
                    answered: 200,
                }
            })
            .collect()
    }

    async fn wait_for(&self, path: &str) -> Received {
        let started = Instant::now();
        loop {
            if let Some(first) = self.received(path).into_iter().next() {
                return first;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the TLS receiver got nothing on {path}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TlsReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn app_for(receiver: &TlsReceiver, trust_its_ca: bool) -> TestApp {
    let callback = receiver.url("127.0.0.1", "/callback");
    let ca_file = receiver.ca_file.to_string_lossy().into_owned();
    let mut flags = vec![
        "--ingestion-callback-url",
        &callback,
        "--webhook-secret",
        SECRET,
        "--delivery-poll-interval-ms",
        "60000",
    ];
    if trust_its_ca {
        flags.extend(["--webhook-ca-file", &ca_file]);
    }
    spawn_app_with(&flags).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_receivers_signed_by_a_configured_ca_get_signed_deliveries() {
    let receiver = TlsReceiver::start();
    let app = app_for(&receiver, true).await;
    let hook = receiver.url("localhost", "/hook");
    let (id, lease) = create_and_claim(&app, json!({"webhook_url": hook})).await;
    let (status, body) = app.succeed(&id, Some(&lease)).await;
    assert_eq!(status, 200, "{body}");

    let callback = receiver.wait_for("/callback").await;
    let webhook = receiver.wait_for("/hook").await;
    for request in [&callback, &webhook] {
        assert!(signature_verifies(SECRET, request), "{request:#?}");
    }
    assert_eq!(callback.body["job_id"], id.as_str());
    assert_eq!(webhook.body["status"], "SUCCESS");
    let deliveries = wait_until_settled(&app, &id, "delivered").await;
    assert_eq!(deliveries.len(), 2, "{deliveries:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_receiver_with_an_unknown_ca_is_refused_and_retried() {
    let receiver = TlsReceiver::start();
    let app = app_for(&receiver, false).await;
    let (id, lease) = create_and_claim(&app, json!({})).await;
    let (status, body) = app.succeed(&id, Some(&lease)).await;
    assert_eq!(status, 200, "{body}");

    // The first attempt fails on the certificate and is recorded; the delivery stays
    // pending for a retry (the receiver may get a trusted certificate).
    let started = Instant::now();
    let attempt = loop {
        let deliveries = deliveries_of(&app, &id).await;
        if let Some(delivery) = deliveries.first() {
            let (status, detail) = app
                .get(&format!("/api/v1/deliveries/{}", delivery["id"]))
                .await;
            assert_eq!(status, 200, "{detail}");
            if let Some(attempt) = detail["attempts"].as_array().and_then(|a| a.first()) {
                assert_eq!(detail["state"], "pending", "{detail}");
                break attempt.clone();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no attempt was recorded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let error = attempt["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(error.contains("certificate"), "{attempt}");
    assert!(receiver.received("/callback").is_empty());
}
