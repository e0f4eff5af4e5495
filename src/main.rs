use clap::Parser;

// glibc's malloc was about a fifth of the server's CPU under load (perf); mimalloc's
// per-thread heaps make the many small allocations of HTTP and row decoding cheaper.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = match morag_jobs::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return refuse_arguments(error),
    };
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(morag_jobs::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) if error.is::<morag_jobs::cli::AlreadyReported>() => {
            std::process::ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Reports flags and variables clap refused: one value's error names the variable or flag
/// the user set, the value and the expected form; under `--json` the report is JSON.
fn refuse_arguments(error: clap::Error) -> std::process::ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        error.exit();
    }
    let argv: Vec<String> = std::env::args().collect();
    let message = morag_jobs::cli::describe_invalid_value(&error, &argv);
    if argv.iter().any(|arg| arg == "--json") {
        let text = message.unwrap_or_else(|| error.render().to_string().trim().to_owned());
        println!(
            "{}",
            serde_json::json!({"error": text, "status": null, "detail": null})
        );
        return std::process::ExitCode::from(2);
    }
    match message {
        Some(message) => {
            eprintln!("error: {message}");
            std::process::ExitCode::from(2)
        }
        None => error.exit(),
    }
}

/// Logs go to stderr; `RUST_LOG` takes `info`, `debug`, or targets like `morag_jobs=debug`.
fn init_tracing() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| spec.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour codes only on a terminal: in files and pipes they split fields.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
}
