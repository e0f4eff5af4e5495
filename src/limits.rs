//! Limits that keep one client from exhausting the server: how large a result may be, how
//! deep and wide its JSON may be, how long a connection may take to send a request or sit
//! idle, how many connections and long polls are served at once; and whether results must
//! carry their lease. Flags and environment variables are read by `LimitArgs`, validated
//! into `Limits`.

use std::time::Duration;

use clap::Args;

use crate::value_parsers::{parse_seconds, parse_whole_number};

const MIB: u64 = 1024 * 1024;

/// The `serve` flags of this module, flattened into `ServeArgs`.
#[derive(Args, Debug, Clone)]
pub struct LimitArgs {
    /// Largest result `content`, in bytes (as decoded from JSON).
    #[arg(long, env = "MORAG_REMOTE_MAX_RESULT_BYTES", default_value_t = 64 * MIB, value_parser = parse_whole_number::<u64>)]
    pub max_result_bytes: u64,
    /// Largest result `metadata` (and job `task_options`), in bytes of compact JSON.
    #[arg(long, env = "MORAG_REMOTE_MAX_METADATA_BYTES", default_value_t = MIB, value_parser = parse_whole_number::<u64>)]
    pub max_metadata_bytes: u64,
    /// Deepest nesting of objects and arrays in `metadata` and `task_options`.
    #[arg(long, env = "MORAG_REMOTE_MAX_JSON_DEPTH", default_value_t = 32, value_parser = parse_whole_number::<u32>)]
    pub max_json_depth: u32,
    /// Most keys plus array elements in one `metadata` or `task_options`, counted at every level.
    #[arg(long, env = "MORAG_REMOTE_MAX_JSON_ENTRIES", default_value_t = 100_000, value_parser = parse_whole_number::<u64>)]
    pub max_json_entries: u64,
    /// Refuse results and downloads that do not name the job's current lease.
    #[arg(long, env = "MORAG_REMOTE_REQUIRE_LEASE")]
    pub require_lease: bool,
    /// Seconds (or a duration such as 30s) a client has to send a whole request head.
    #[arg(long, env = "MORAG_JOBS_HTTP_HEADER_TIMEOUT", default_value = "30", value_parser = parse_seconds)]
    pub http_header_timeout: u64,
    /// Seconds (or a duration such as 5m) a client has to send a whole request body.
    #[arg(long, env = "MORAG_JOBS_HTTP_BODY_TIMEOUT", default_value = "300", value_parser = parse_seconds)]
    pub http_body_timeout: u64,
    /// Seconds (or a duration) a keep-alive connection may wait for its next request.
    #[arg(long, env = "MORAG_JOBS_HTTP_IDLE_TIMEOUT", default_value = "75", value_parser = parse_seconds)]
    pub http_idle_timeout: u64,
    /// Open connections at most; more are answered 503 and closed.
    #[arg(long, env = "MORAG_JOBS_HTTP_MAX_CONNECTIONS", default_value_t = 512, value_parser = parse_whole_number::<usize>)]
    pub http_max_connections: usize,
    /// Long polls (`wait` > 0) waiting at once at most; more are answered at once.
    #[arg(long, env = "MORAG_REMOTE_MAX_LONG_POLLS", default_value_t = 256, value_parser = parse_whole_number::<usize>)]
    pub max_long_polls: usize,
}

/// Limits on one JSON value from a request (`metadata`, `task_options`), enforced while
/// the wire types parse (`morag_jobs_client::wire::bounded_json`).
pub use morag_jobs_client::wire::bounded_json::JsonLimits;

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
    /// Validates the flags; an error names the variable at fault.
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        limits: LimitArgs,
    }

    fn limits(flags: &[&str]) -> Result<Limits, String> {
        let mut argv = vec!["test"];
        argv.extend_from_slice(flags);
        Limits::from_args(&Wrapper::try_parse_from(argv).unwrap().limits)
    }

    #[test]
    fn defaults_and_the_bodies_they_allow() {
        let defaults = limits(&[]).unwrap();
        assert_eq!(defaults.max_result_bytes, 64 * MIB);
        assert_eq!(defaults.json.max_bytes, MIB);
        assert!(!defaults.require_lease);
        assert_eq!(
            defaults.max_result_body_bytes() as u64,
            65 * MIB + RESULT_BODY_SLACK
        );
        assert_eq!(defaults.idle_timeout, Duration::from_secs(75));
    }

    #[test]
    fn zero_and_too_deep_are_refused_with_the_variable_name() {
        for (flags, variable) in [
            (["--max-result-bytes", "0"], "MORAG_REMOTE_MAX_RESULT_BYTES"),
            (["--max-json-depth", "129"], "MORAG_REMOTE_MAX_JSON_DEPTH"),
            (["--http-idle-timeout", "0"], "MORAG_JOBS_HTTP_IDLE_TIMEOUT"),
            (
                ["--http-max-connections", "0"],
                "MORAG_JOBS_HTTP_MAX_CONNECTIONS",
            ),
        ] {
            let error = limits(&flags).unwrap_err();
            assert!(error.contains(variable), "{error}");
        }
    }
}
