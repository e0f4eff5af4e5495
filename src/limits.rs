//! Limits that keep one client from exhausting the server: how large a result may be, how
//! deep and wide its JSON may be, how long a connection may take to send a request or sit
//! idle, how many connections and long polls are served at once; and whether results must
//! carry their lease. Flags and environment variables are read by `LimitArgs`, validated
//! into `Limits`.

use std::time::Duration;

use clap::Args;

const MIB: u64 = 1024 * 1024;

/// The `serve` flags of this module, flattened into `ServeArgs`.
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// Largest result `content`, in bytes (as decoded from JSON).
    #[arg(long, env = "MORAG_REMOTE_MAX_RESULT_BYTES", default_value_t = 64 * MIB)]
    pub max_result_bytes: u64,
    /// Largest result `metadata` (and job `task_options`), in bytes of compact JSON.
    #[arg(long, env = "MORAG_REMOTE_MAX_METADATA_BYTES", default_value_t = MIB)]
    pub max_metadata_bytes: u64,
    /// Deepest nesting of objects and arrays in `metadata` and `task_options`.
    #[arg(long, env = "MORAG_REMOTE_MAX_JSON_DEPTH", default_value_t = 32)]
    pub max_json_depth: u32,
    /// Most keys plus array elements in one `metadata` or `task_options`, counted at every level.
    #[arg(long, env = "MORAG_REMOTE_MAX_JSON_ENTRIES", default_value_t = 100_000)]
    pub max_json_entries: u64,
    /// Refuse results and downloads that do not name the job's current lease.
    #[arg(long, env = "MORAG_REMOTE_REQUIRE_LEASE")]
    pub require_lease: bool,
    /// Seconds a client has to send a whole request head.
    #[arg(long, env = "MORAG_JOBS_HTTP_HEADER_TIMEOUT", default_value_t = 30)]
    pub http_header_timeout: u64,
    /// Seconds a client has to send a whole request body.
    #[arg(long, env = "MORAG_JOBS_HTTP_BODY_TIMEOUT", default_value_t = 300)]
    pub http_body_timeout: u64,
    /// Seconds a keep-alive connection may wait for its next request.
    #[arg(long, env = "MORAG_JOBS_HTTP_IDLE_TIMEOUT", default_value_t = 75)]
    pub http_idle_timeout: u64,
    /// Open connections at most; more are answered 503 and closed.
    #[arg(long, env = "MORAG_JOBS_HTTP_MAX_CONNECTIONS", default_value_t = 512)]
    pub http_max_connections: usize,
    /// Long polls (`wait` > 0) waiting at once at most; more are answered at once.
    #[arg(long, env = "MORAG_REMOTE_MAX_LONG_POLLS", default_value_t = 256)]
    pub max_long_polls: usize,
}

/// Limits on one JSON value from a request (`metadata`, `task_options`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonLimits {
    pub max_bytes: u64,
    pub max_depth: u32,
    pub max_entries: u64,
}

/// The validated limits.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_result_bytes: u64,
    pub json: JsonLimits,
    pub require_lease: bool,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_long_polls: usize,
}

/// Room in a result body for everything but content and metadata (the other fields, JSON
/// escapes of a few control characters).
const RESULT_BODY_SLACK: u64 = 64 * 1024;

impl Limits {
    /// Checks the flags; the error names the variable (the config reports it).
    pub fn from_args(args: &LimitArgs) -> Result<Limits, String> {
        let at_least_one = |name: &str, value: u64| {
            if value == 0 {
                Err(format!("{name} must be at least 1"))
            } else {
                Ok(value)
            }
        };
        at_least_one("MORAG_REMOTE_MAX_RESULT_BYTES", args.max_result_bytes)?;
        at_least_one("MORAG_REMOTE_MAX_METADATA_BYTES", args.max_metadata_bytes)?;
        at_least_one("MORAG_REMOTE_MAX_JSON_DEPTH", args.max_json_depth.into())?;
        at_least_one("MORAG_REMOTE_MAX_JSON_ENTRIES", args.max_json_entries)?;
        at_least_one(
            "MORAG_JOBS_HTTP_MAX_CONNECTIONS",
            args.http_max_connections as u64,
        )?;
        // serde_json stops at 128 levels by itself; a deeper setting would be a lie.
        if args.max_json_depth > 128 {
            return Err("MORAG_REMOTE_MAX_JSON_DEPTH must be at most 128".into());
        }
        let secs = |name: &str, value: u64| at_least_one(name, value).map(Duration::from_secs);
        Ok(Limits {
            max_result_bytes: args.max_result_bytes,
            json: JsonLimits {
                max_bytes: args.max_metadata_bytes,
                max_depth: args.max_json_depth,
                max_entries: args.max_json_entries,
            },
            require_lease: args.require_lease,
            header_timeout: secs("MORAG_JOBS_HTTP_HEADER_TIMEOUT", args.http_header_timeout)?,
            body_timeout: secs("MORAG_JOBS_HTTP_BODY_TIMEOUT", args.http_body_timeout)?,
            idle_timeout: secs("MORAG_JOBS_HTTP_IDLE_TIMEOUT", args.http_idle_timeout)?,
            max_connections: args.http_max_connections,
            max_long_polls: args.max_long_polls,
        })
    }

    /// The largest result body accepted: content and metadata at their limits, plus room
    /// for the other fields.
    pub fn max_result_body_bytes(&self) -> usize {
        usize::try_from(self.max_result_bytes + self.json.max_bytes + RESULT_BODY_SLACK)
            .unwrap_or(usize::MAX)
    }

    /// The largest create body: `task_options` at its limit plus the other fields.
    pub fn max_create_body_bytes(&self) -> usize {
        usize::try_from(self.json.max_bytes + RESULT_BODY_SLACK).unwrap_or(usize::MAX)
    }
}
