//! README.md's walkthrough, run exactly as printed against the real binary: each `#>`
//! comment in it must be the output of the step above (`...` stands for anything), so
//! the README cannot drift from what the server does.

use std::process::Command;

use crate::support::free_port;

const BEGIN: &str = "<!-- walkthrough:begin -->";
const END: &str = "<!-- walkthrough:end -->";

/// The shell code of the fenced block between the walkthrough markers.
fn walkthrough() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find(BEGIN)
        .expect("README has the walkthrough begin marker");
    let end = readme
        .find(END)
        .expect("README has the walkthrough end marker");
    let block = &readme[start + BEGIN.len()..end];
    let code = block
        .trim()
        .strip_prefix("```sh\n")
        .and_then(|code| code.strip_suffix("```"))
        .expect("one ```sh block between the markers");
    code.to_owned()
}

/// `line` matches `pattern` where every `...` in the pattern stands for any text.
fn matches(pattern: &str, line: &str) -> bool {
    let pieces: Vec<&str> = pattern.split("...").collect();
    if pieces.len() == 1 {
        return pattern == line;
    }
    let (first, last) = (pieces[0], pieces[pieces.len() - 1]);
    if !line.starts_with(first) || !line[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for piece in &pieces[1..pieces.len() - 1] {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

#[test]
fn the_pattern_matcher_treats_dots_as_anything() {
    assert!(matches("a...c", "abbbc"));
    assert!(matches("{\"id\":\"...\"}", "{\"id\":\"x-1\"}"));
    assert!(!matches("a...c", "abbbd"));
    assert!(matches("exact", "exact"));
    assert!(!matches("a...b...c", "acb"));
}

#[test]
fn the_readme_walkthrough_runs_as_printed_and_prints_what_it_shows() {
    let code = walkthrough();
    let expected: Vec<&str> = code
        .lines()
        .filter_map(|line| {
            line.strip_prefix("#> ")
                .or_else(|| (line == "#>").then_some(""))
        })
        .collect();
    assert!(expected.len() > 10, "the walkthrough shows its outputs");

    let binary_dir = std::path::Path::new(env!("CARGO_BIN_EXE_morag-jobs"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}",
        binary_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // From a directory that is not the checkout, as a reader would.
    let elsewhere = tempfile::tempdir().unwrap();
    let output = Command::new("bash")
        .args(["-c", &code])
        .current_dir(elsewhere.path())
        .env("PATH", path)
        .env("WALKTHROUGH_PORT", free_port().to_string())
        .env_remove("MORAG_JOBS_URL")
        .env_remove("MORAG_JOBS_API_KEY")
        .env_remove("MORAG_DATABASE_URL")
        .env_remove("MORAG_ADMIN_API_KEYS")
        .env_remove("MORAG_WORKER_API_KEYS")
        .env_remove("MORAG_REMOTE_ALLOWED_ROOTS")
        .output()
        .expect("bash runs the walkthrough");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the walkthrough failed:\n{stdout}\n{stderr}"
    );
    let actual: Vec<&str> = stdout.lines().collect();
    for (index, pattern) in expected.iter().enumerate() {
        let line = actual.get(index).copied().unwrap_or("<no more output>");
        assert!(
            matches(pattern, line),
            "output line {} differs from the README\nREADME: {pattern}\nactual: {line}\n\nwhole output:\n{stdout}",
            index + 1
        );
    }
    assert_eq!(
        actual.len(),
        expected.len(),
        "every output line is shown in the README:\n{stdout}"
    );
}
