//! The converter command: its command line, its process group, its output, and stopping
//! it. The command runs through `sh -c` in a process group of its own, so stopping it
//! reaches every process it started.

use std::collections::VecDeque;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{kill_process_group, test_kill_process_group, Pid, Signal};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Stderr lines kept for a failure's message, and the length each is cut to.
const TAIL_LINES: usize = 20;
const TAIL_LINE_CHARS: usize = 500;
/// The server takes progress messages of up to 1000 characters.
const PROGRESS_MESSAGE_CHARS: usize = 1000;

/// Quotes `text` for `sh`: one single-quoted word, whatever it contains.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The command line with `{input}`, `{job_id}` and `{content_type}` replaced by their
/// shell-quoted values (in one pass, so a value that contains a placeholder stays as it is).
pub fn render_command(template: &str, input: &str, job_id: &str, content_type: &str) -> String {
    let mut rendered = String::with_capacity(template.len() + input.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        rendered.push_str(&rest[..start]);
        let after = &rest[start..];
        let replaced = [
            ("{input}", input),
            ("{job_id}", job_id),
            ("{content_type}", content_type),
        ]
        .into_iter()
        .find(|(placeholder, _)| after.starts_with(placeholder));
        match replaced {
            Some((placeholder, value)) => {
                rendered.push_str(&shell_quote(value));
                rest = &after[placeholder.len()..];
            }
            None => {
                rendered.push('{');
                rest = &after[1..];
            }
        }
    }
    rendered.push_str(rest);
    rendered
}

/// A `PROGRESS <percent> <message>` line: the percent (0 to 100) and the message.
pub fn parse_progress(line: &str) -> Option<(f64, String)> {
    let rest = line.strip_prefix("PROGRESS ")?;
    let (number, message) = rest
        .trim_start()
        .split_once(' ')
        .unwrap_or((rest.trim(), ""));
    let percent: f64 = number.trim().parse().ok()?;
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return None;
    }
    Some((
        percent,
        message
            .trim()
            .chars()
            .take(PROGRESS_MESSAGE_CHARS)
            .collect(),
    ))
}

/// The latest progress the command reported, for the next heartbeat.
#[derive(Default)]
pub struct ProgressReport {
    pub latest: Mutex<Option<(f64, String)>>,
    /// Signalled on each new report, so a heartbeat can carry it soon.
    pub changed: Notify,
}

/// The last lines of the command's stderr that were not progress reports.
#[derive(Default)]
pub struct StderrTail(Mutex<VecDeque<String>>);

impl StderrTail {
    fn push(&self, line: &str) {
        let mut lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line.chars().take(TAIL_LINE_CHARS).collect());
    }

    pub fn text(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// What a finished command left.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
}

/// A started converter command.
pub struct Running {
    child: Child,
    /// Kills the group if the worker dies (`spawn_guard`); stopped with the command.
    guard: Option<Child>,
    group: Pid,
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<()>,
    pub tail: Arc<StderrTail>,
}

/// The worker's lifeline: a pipe whose write end only this process holds (both ends are
/// close-on-exec, so no command inherits the write end). When the worker dies, however it
/// dies, the kernel closes the write end, and the guards reading the other end see it.
fn lifeline() -> Option<std::io::PipeReader> {
    static LIFELINE: std::sync::OnceLock<Option<(std::io::PipeReader, std::io::PipeWriter)>> =
        std::sync::OnceLock::new();
    LIFELINE
        .get_or_init(|| std::io::pipe().ok())
        .as_ref()
        .and_then(|(read, _write)| read.try_clone().ok())
}

/// Starts a guard in the command's process group that kills the group when the worker dies,
/// even by SIGKILL, which lets the worker stop nothing itself. The guard is a shell reading
/// the lifeline: the read ends only when the worker is gone (nothing is ever written), and
/// then it kills the group, itself included. It is the worker's own child, so the worker
/// reaps it (a guard forked by the command's shell would be left to PID 1 to reap, which a
/// worker running as a container's PID 1 never does). Linux's parent-death signal would
/// reach only the command's shell: `sh -c` forks the programs it runs.
fn spawn_guard(group: Pid) -> Option<Child> {
    let lifeline = lifeline()?;
    Command::new("sh")
        .arg("-c")
        .arg(r#"read _ || kill -KILL -"$1""#)
        .arg("morag-job-guard")
        .arg(group.as_raw_nonzero().to_string())
        .stdin(Stdio::from(lifeline))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(group.as_raw_nonzero().get())
        .kill_on_drop(true)
        .spawn()
        .ok()
}

impl Running {
    /// Starts `sh -c command_line` in `dir`, in a new process group, with `env` added.
    pub fn spawn(
        command_line: &str,
        dir: &Path,
        env: &[(&str, String)],
        progress: Arc<ProgressReport>,
    ) -> std::io::Result<Running> {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(command_line)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn()?;
        let pid = child
            .id()
            .and_then(|id| Pid::from_raw(id as i32))
            .ok_or_else(|| std::io::Error::other("the command exited before it started"))?;
        // A command that already ended has no group left to guard (`None`).
        let guard = spawn_guard(pid);
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let tail = Arc::new(StderrTail::default());
        let stdout = tokio::spawn(async move {
            let mut output = Vec::new();
            let _ = stdout.read_to_end(&mut output).await;
            output
        });
        let stderr = {
            let tail = tail.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stderr);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match reader.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']);
                    match parse_progress(text) {
                        Some(report) => {
                            *progress.latest.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(report);
                            progress.changed.notify_one();
                        }
                        None => tail.push(text),
                    }
                }
            })
        };
        Ok(Running {
            child,
            guard,
            group: pid,
            stdout,
            stderr,
            tail,
        })
    }

    /// Waits for the shell to exit. Cancel-safe: dropping the future leaves it running.
    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// After the shell exited: collects its output, giving processes it left behind
    /// `grace` to close the pipes, and then kills whatever remains of its group (it may
    /// still be using the job's temporary directory, which is about to go).
    pub async fn finish(mut self, status: ExitStatus, grace: Duration) -> Finished {
        let readers = async {
            let stdout = (&mut self.stdout).await.unwrap_or_default();
            let _ = (&mut self.stderr).await;
            stdout
        };
        let stdout = match tokio::time::timeout(grace, readers).await {
            Ok(stdout) => stdout,
            Err(_) => {
                self.kill_group(Signal::KILL);
                // A process that left the group (setsid) may still hold a pipe: give up on it.
                tokio::time::timeout(grace, async {
                    let stdout = (&mut self.stdout).await.unwrap_or_default();
                    let _ = (&mut self.stderr).await;
                    stdout
                })
                .await
                .unwrap_or_default()
            }
        };
        self.stop_guard().await;
        if test_kill_process_group(self.group).is_ok() {
            self.kill_group(Signal::KILL);
        }
        self.stdout.abort();
        self.stderr.abort();
        Finished { status, stdout }
    }

    /// Stops the command: SIGTERM to its process group, SIGKILL after `grace` if the shell
    /// has not exited by then, and SIGKILL to any process of the group still left.
    pub async fn stop(mut self, grace: Duration) {
        self.kill_group(Signal::TERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.kill_group(Signal::KILL);
            let _ = self.child.wait().await;
        }
        if test_kill_process_group(self.group).is_ok() {
            // Children that ignored SIGTERM, or are still shutting down after the shell.
            tokio::time::sleep(grace.min(Duration::from_millis(200))).await;
            self.kill_group(Signal::KILL);
        }
        self.stop_guard().await;
        self.stdout.abort();
        self.stderr.abort();
    }

    /// Ends and reaps the guard: the worker is alive and handles the group itself.
    async fn stop_guard(&mut self) {
        if let Some(mut guard) = self.guard.take() {
            let _ = guard.kill().await;
        }
    }

    fn kill_group(&self, signal: Signal) {
        // ESRCH (the group is gone) is what we wanted anyway.
        let _ = kill_process_group(self.group, signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes_and_shell_syntax() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's $(x)"), r"'it'\''s $(x)'");
    }

    #[test]
    fn placeholders_are_replaced_once_and_quoted() {
        assert_eq!(
            render_command(
                "conv {input} --id {job_id} -t {content_type} {other} {",
                "/tmp/x y/{job_id}",
                "j1",
                "audio"
            ),
            "conv '/tmp/x y/{job_id}' --id 'j1' -t 'audio' {other} {"
        );
    }

    #[test]
    fn progress_lines_are_parsed_and_others_are_not() {
        assert_eq!(
            parse_progress("PROGRESS 42.5 decoding audio"),
            Some((42.5, "decoding audio".into()))
        );
        assert_eq!(parse_progress("PROGRESS 100"), Some((100.0, String::new())));
        assert_eq!(parse_progress("PROGRESS 101 too much"), None);
        assert_eq!(parse_progress("PROGRESS -1 negative"), None);
        assert_eq!(parse_progress("PROGRESS NaN what"), None);
        assert_eq!(parse_progress("progress 5 lower case"), None);
        assert_eq!(parse_progress("warning: PROGRESS 5"), None);
    }
}
