//! Attacks on the file roots through the real server: while workers download and cleanup
//! runs, a directory inside a root flips between a real directory and a symlink to the
//! outside, and a source file flips between a regular file and a FIFO. No byte from
//! outside a root may be served, no file outside deleted, and no request or thread may hang.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{spawn_app, spawn_app_with, TestApp};

const JOBS: &str = "/api/v1/remote-jobs";
const INSIDE: &[u8] = b"inside bytes: the real source file of the job";
const SECRET: &[u8] = b"SECRET from outside every root, must never be served";

/// Swaps two names atomically (`renameat2(RENAME_EXCHANGE)`) in a loop on its own thread
/// until dropped, so every lookup of either name sees one or the other, never neither.
struct Flipper {
    stop: Arc<AtomicBool>,
    flips: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flipper {
    fn start(first: PathBuf, second: PathBuf) -> Flipper {
        let stop = Arc::new(AtomicBool::new(false));
        let flips = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, flips) = (stop.clone(), flips.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    exchange(&first, &second);
                    flips.fetch_add(1, Ordering::Relaxed);
                    std::thread::yield_now();
                }
            })
        };
        Flipper {
            stop,
            flips,
            thread: Some(thread),
        }
    }

    /// Stops flipping; returns how many flips were made.
    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("flipper thread");
        }
        self.flips.load(Ordering::Relaxed)
    }
}

impl Drop for Flipper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn exchange(first: &Path, second: &Path) {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        first,
        rustix::fs::CWD,
        second,
        rustix::fs::RenameFlags::EXCHANGE,
    )
    .expect("renameat2(RENAME_EXCHANGE)");
}

/// Makes `DATA_DIR/files/flip` a real directory and `DATA_DIR/files/flip-link` a symlink to
/// `outside`; returns (flip, flip-link).
fn flip_pair(app: &TestApp, outside: &Path) -> (PathBuf, PathBuf) {
    let flip = app.files_dir.join("flip");
    let link = app.files_dir.join("flip-link");
    std::fs::create_dir(&flip).unwrap();
    std::os::unix::fs::symlink(outside, &link).unwrap();
    (flip, link)
}

/// Puts the real directory back under `flip` after the flipper stopped at either state.
fn settle(flip: &Path, link: &Path) {
    if flip.symlink_metadata().unwrap().file_type().is_symlink() {
        exchange(flip, link);
    }
}

fn is_json_client_error(status: u16, body: &[u8]) -> bool {
    (400..500).contains(&status)
        && serde_json::from_slice::<Value>(body).is_ok_and(|v| v["detail"].is_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_never_serves_a_file_outside_the_roots_while_a_directory_flips() {
    let app = spawn_app().await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("source.bin"), SECRET).unwrap();
    let (flip, link) = flip_pair(&app, outside.path());
    std::fs::write(flip.join("source.bin"), INSIDE).unwrap();
    let (status, body) = app
        .post(
            &format!("{JOBS}/"),
            json!({"source_file_path": flip.join("source.bin"), "content_type": "audio", "ingestion_task_id": "i"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (id, _lease) = app.claim("w1", "audio").await;
    let url = app.url(&format!("{JOBS}/{id}/download"));

    let flipper = Flipper::start(flip.clone(), link.clone());
    let deadline = Instant::now() + Duration::from_secs(4);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let downloaders: Vec<_> = (0..6)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let (mut served, mut refused, mut leaked, mut other) = (0, 0, 0, Vec::new());
                while Instant::now() < deadline {
                    let response = client.get(&url).send().await.expect("server answers");
                    let status = response.status().as_u16();
                    let bytes = response.bytes().await.expect("body");
                    if status == 200 && bytes.as_ref() == INSIDE {
                        served += 1;
                    } else if status == 200 {
                        leaked += 1;
                    } else if is_json_client_error(status, &bytes) {
                        refused += 1;
                    } else {
                        other.push((status, String::from_utf8_lossy(&bytes).into_owned()));
                    }
                }
                (served, refused, leaked, other)
            })
        })
        .collect();
    let (mut served, mut refused, mut leaked, mut other) = (0, 0, 0, Vec::new());
    for downloader in downloaders {
        let (s, r, l, o) = downloader.await.unwrap();
        served += s;
        refused += r;
        leaked += l;
        other.extend(o);
    }
    let flips = flipper.stop();
    settle(&flip, &link);
    eprintln!("downloads: {served} served, {refused} refused, {leaked} leaked; {flips} flips");
    assert_eq!(
        leaked, 0,
        "{leaked} downloads served bytes from outside the roots"
    );
    assert!(other.is_empty(), "answers that are not 4xx JSON: {other:?}");
    assert!(
        served > 0 && refused > 0,
        "the race must have been exercised both ways ({served} served, {refused} refused)"
    );
    assert_eq!(
        std::fs::read(outside.path().join("source.bin")).unwrap(),
        SECRET
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_never_deletes_a_file_outside_while_a_directory_flips() {
    let app = Arc::new(spawn_app().await);
    let decoy = tempfile::tempdir().unwrap();
    let (flip, link) = flip_pair(&app, decoy.path());
    let started = Instant::now();
    let (mut exposed, mut inside_deleted, mut rounds, mut flips) = (0, 0, 0, 0);
    // Round 0 is a control without flipping: it shows that this setup makes cleanup delete
    // the server's own files. Then rounds with flipping, until enough decoys were exposed
    // or the time budget is spent. Whether one round's cleanup meets the directory or the
    // link depends on scheduling, so many small rounds sample both.
    while rounds < 3 || (exposed < 1_500 && started.elapsed() < Duration::from_secs(6)) {
        let names: Vec<String> = (0..100).map(|i| format!("r{rounds}-{i}.bin")).collect();
        for name in &names {
            std::fs::write(flip.join(name), INSIDE).unwrap();
            std::fs::write(decoy.path().join(name), SECRET).unwrap();
        }
        // Jobs are created while `flip` is a real directory and cancelled, so each is a
        // finished job whose source file only it uses.
        for chunk in names.chunks(16) {
            let mut creating = tokio::task::JoinSet::new();
            for name in chunk {
                let (app, path) = (app.clone(), flip.join(name));
                creating.spawn(async move {
                    let (status, body) = app
                        .post(
                            &format!("{JOBS}/"),
                            json!({"source_file_path": path, "content_type": "audio", "ingestion_task_id": "i"}),
                        )
                        .await;
                    assert_eq!(status, 200, "{body}");
                    let id = body["job_id"].as_str().unwrap().to_owned();
                    let (status, body) =
                        app.post(&format!("{JOBS}/{id}/cancel"), json!({})).await;
                    assert_eq!(status, 200, "{body}");
                });
            }
            while let Some(created) = creating.join_next().await {
                created.unwrap();
            }
        }
        app.advance(1);

        let control = rounds == 0;
        let flipper = (!control).then(|| Flipper::start(flip.clone(), link.clone()));
        let (status, body) = app
            .post(&format!("{JOBS}/cleanup?days_old=0"), json!(null))
            .await;
        flips += flipper.map_or(0, Flipper::stop);
        settle(&flip, &link);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["cleaned_jobs"], names.len(), "{body}");
        let deleted = names.iter().filter(|n| !flip.join(n).exists()).count();
        if control {
            assert_eq!(
                deleted,
                names.len(),
                "without flipping, cleanup deletes its own files"
            );
        } else {
            inside_deleted += deleted;
            exposed += names.len();
        }
        rounds += 1;
    }
    let decoys = std::fs::read_dir(decoy.path()).unwrap().count();
    let decoys_deleted = exposed + 100 - decoys;
    eprintln!(
        "cleanup: {rounds} rounds, {exposed} decoys exposed to flipping, {decoys_deleted} decoys deleted, \
         {inside_deleted} own files deleted, {flips} flips"
    );
    assert_eq!(
        decoys_deleted, 0,
        "files outside DATA_DIR/files were deleted"
    );
    assert!(flips > 0, "the directory must have flipped during cleanups");
}

/// The name of the threads of the FIFO test's runtime (at most 15 bytes, the kernel's limit).
const FIFO_RUNTIME_THREADS: &str = "fifo-race-rt";

/// Threads of the FIFO test's runtime alive now (workers and blocking threads), counted by
/// name so other tests running in the same process do not disturb the count.
fn runtime_thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == FIFO_RUNTIME_THREADS)
        .count()
}

/// The server runs in this test's own runtime, whose idle blocking threads exit after
/// 100 ms, so its threads still alive after the downloads are threads stuck in a system call.
#[test]
fn downloads_never_hang_on_a_fifo_and_threads_return_to_baseline() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_keep_alive(Duration::from_millis(100))
        .thread_name(FIFO_RUNTIME_THREADS)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let app = spawn_app().await;
        let source = app.files_dir.join("source.bin");
        let fifo = app.files_dir.join("source.fifo");
        std::fs::write(&source, INSIDE).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let (status, body) = app
            .post(
                &format!("{JOBS}/"),
                json!({"source_file_path": source, "content_type": "audio", "ingestion_task_id": "i"}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (id, _lease) = app.claim("w1", "audio").await;
        let url = app.url(&format!("{JOBS}/{id}/download"));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        // Warm up, then let the idle blocking threads exit before counting.
        let warm = client.get(&url).send().await.unwrap();
        assert_eq!(warm.status(), 200);
        warm.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let baseline = runtime_thread_count();

        let flipper = Flipper::start(source.clone(), fifo.clone());
        let deadline = Instant::now() + Duration::from_secs(3);
        let downloaders: Vec<_> = (0..6)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move {
                    let (mut served, mut refused, mut hung, mut other) = (0, 0, 0, Vec::new());
                    while Instant::now() < deadline {
                        let outcome = async {
                            let response = client.get(&url).send().await?;
                            let status = response.status().as_u16();
                            Ok::<_, reqwest::Error>((status, response.bytes().await?))
                        }
                        .await;
                        match outcome {
                            Ok((200, bytes)) if bytes.as_ref() == INSIDE => served += 1,
                            Ok((status, bytes)) if is_json_client_error(status, &bytes) => {
                                refused += 1
                            }
                            Ok((status, bytes)) => {
                                other.push((status, String::from_utf8_lossy(&bytes).into_owned()))
                            }
                            Err(error) if error.is_timeout() => hung += 1,
                            Err(error) => panic!("download failed: {error}"),
                        }
                    }
                    (served, refused, hung, other)
                })
            })
            .collect();
        let (mut served, mut refused, mut hung, mut other) = (0, 0, 0, Vec::new());
        for downloader in downloaders {
            let (s, r, h, o) = downloader.await.unwrap();
            served += s;
            refused += r;
            hung += h;
            other.extend(o);
        }
        let flips = flipper.stop();

        let settle_deadline = Instant::now() + Duration::from_secs(3);
        let mut threads = runtime_thread_count();
        while threads > baseline && Instant::now() < settle_deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            threads = runtime_thread_count();
        }
        eprintln!(
            "fifo downloads: {served} served, {refused} refused, {hung} hung; {flips} flips; \
             threads {baseline} before, {threads} after"
        );
        // Release any thread stuck opening the FIFO before asserting, so a failure
        // does not leave the runtime unable to shut down.
        release_fifo_readers(&[&source, &fifo]);
        assert_eq!(hung, 0, "{hung} downloads never finished");
        assert!(other.is_empty(), "answers that are not 4xx JSON: {other:?}");
        assert!(
            threads <= baseline,
            "threads stuck: {baseline} before the downloads, {threads} after"
        );
        assert!(
            served > 0 && refused > 0,
            "the race must have been exercised both ways ({served} served, {refused} refused)"
        );
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// Opens each FIFO for writing and closes it, so readers blocked in `open` return.
fn release_fifo_readers(paths: &[&Path]) {
    use std::os::unix::fs::OpenOptionsExt;
    for path in paths {
        let is_fifo = std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_fifo()
        });
        if is_fifo {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                .open(path);
        }
    }
}

/// Not a race, but the same defence seen from a client: with `--refuse-hardlinks`, a file
/// with a second hard link is refused at creation (422) and, if the link appears later, at
/// download (404 saying why).
#[tokio::test]
async fn refuse_hardlinks_refuses_linked_files_at_creation_and_download() {
    let app = spawn_app_with(&["--refuse-hardlinks"]).await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), SECRET).unwrap();
    let linked = app.files_dir.join("linked.bin");
    std::fs::hard_link(outside.path().join("secret"), &linked).unwrap();
    let (status, body) = app
        .post(
            &format!("{JOBS}/"),
            json!({"source_file_path": linked, "content_type": "audio", "ingestion_task_id": "i"}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("hard link"), "{body}");

    let id = app.create("audio").await;
    let source = app.detail(&id).await["source_file_path"]
        .as_str()
        .unwrap()
        .to_owned();
    app.claim("w1", "audio").await;
    let download = format!("{JOBS}/{id}/download");
    let (status, _) = app.get(&download).await;
    assert_eq!(status, 200);
    std::fs::hard_link(&source, outside.path().join("second-name")).unwrap();
    let (status, body) = app.get(&download).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        body["detail"],
        format!("Source file for job {id} has more than one hard link, which this server refuses")
    );

    // Without the flag the same file is served: the roots cannot tell a link from a name.
    let open = spawn_app().await;
    let linked = open.files_dir.join("linked.bin");
    std::fs::hard_link(outside.path().join("secret"), &linked).unwrap();
    let (status, body) = open
        .post(
            &format!("{JOBS}/"),
            json!({"source_file_path": linked, "content_type": "audio", "ingestion_task_id": "i"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

/// A source replaced by a FIFO after creation gets a prompt 404 naming the reason.
#[tokio::test]
async fn a_source_replaced_by_a_fifo_is_refused_promptly() {
    let app = spawn_app().await;
    let id = app.create("audio").await;
    let source = app.detail(&id).await["source_file_path"]
        .as_str()
        .unwrap()
        .to_owned();
    app.claim("w1", "audio").await;
    std::fs::remove_file(&source).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        source.as_str(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(5),
        app.get(&format!("{JOBS}/{id}/download")),
    )
    .await
    .expect("the download answers without waiting for a FIFO writer");
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        body["detail"],
        format!("Source file for job {id} is not a regular file")
    );
}
