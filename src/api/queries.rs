//! Query strings that parse themselves: each `*Query` (what axum deserialises, every field
//! an optional string) turns into validated `*Args` or a 422 naming the field, so handlers
//! read as parse, call the store, answer.

use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::error::ApiError;
use crate::domain::{ContentType, JobStatus, WorkerId};
use crate::store::ListParams;

/// The longest a poll may wait for a job.
pub const MAX_POLL_WAIT: Duration = Duration::from_secs(30);
/// The protocol answers one job per poll; larger `max_jobs` values are accepted for
/// compatibility but still claim one job (the prototype claimed several and lost all but one).
const MAX_JOBS_LIMIT: u32 = 100;
/// Each requested type costs one index probe per claim attempt; a worker converts a
/// handful of types, so a long list is a mistake (or an attack), not a need.
const MAX_CONTENT_TYPES_PER_POLL: usize = 32;
const MAX_LIST_LIMIT: usize = 500;
const DEFAULT_LIST_LIMIT: usize = 50;
const MAX_CLEANUP_DAYS: u32 = 36_500;
const DEFAULT_CLEANUP_DAYS: u32 = 7;

/// Reads an optional number from a query string: absent gives `default`; anything that does
/// not parse (a blank value included) or lies outside `range` is a 422 for `field` saying
/// `expected`.
fn bounded<T>(
    raw: Option<&str>,
    field: &str,
    default: T,
    range: std::ops::RangeInclusive<T>,
    expected: &str,
) -> Result<T, ApiError>
where
    T: FromStr + PartialOrd,
{
    let Some(text) = raw else {
        return Ok(default);
    };
    text.trim()
        .parse::<T>()
        .ok()
        .filter(|value| range.contains(value))
        .ok_or_else(|| ApiError::validation(&["query", field], expected))
}

/// An optional query field that is blank when absent.
fn present(raw: &Option<String>) -> Option<&str> {
    raw.as_deref().map(str::trim).filter(|t| !t.is_empty())
}

#[derive(Deserialize)]
pub struct PollQuery {
    pub worker_id: Option<String>,
    pub content_types: Option<String>,
    pub max_jobs: Option<String>,
    pub wait: Option<String>,
}

/// A validated poll.
#[derive(Debug)]
pub struct PollArgs {
    pub worker_id: WorkerId,
    /// Empty means any type; no duplicates.
    pub content_types: Vec<ContentType>,
    /// How long to wait for a job when none is due (zero: answer at once).
    pub wait: Duration,
}

impl PollQuery {
    pub fn parse(self) -> Result<PollArgs, ApiError> {
        let worker_id = WorkerId::parse(self.worker_id.as_deref().unwrap_or(""))
            .map_err(|error| ApiError::invalid("query", error))?;
        let mut content_types: Vec<ContentType> = Vec::new();
        for part in self
            .content_types
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let content_type =
                ContentType::parse(part).map_err(|error| ApiError::invalid("query", error))?;
            if !content_types.contains(&content_type) {
                content_types.push(content_type);
            }
            if content_types.len() > MAX_CONTENT_TYPES_PER_POLL {
                return Err(ApiError::validation(
                    &["query", "content_types"],
                    format!("at most {MAX_CONTENT_TYPES_PER_POLL} content types per poll"),
                ));
            }
        }
        // Checked for the client's sake, then ignored: one job per poll.
        bounded(
            self.max_jobs.as_deref(),
            "max_jobs",
            1,
            1..=MAX_JOBS_LIMIT,
            &format!("must be an integer from 1 to {MAX_JOBS_LIMIT}"),
        )?;
        let wait_secs = bounded(
            self.wait.as_deref(),
            "wait",
            0.0,
            0.0..=MAX_POLL_WAIT.as_secs_f64(),
            "must be a number of seconds from 0 to 30",
        )?;
        Ok(PollArgs {
            worker_id,
            content_types,
            wait: Duration::from_secs_f64(wait_secs),
        })
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    pub status: Option<String>,
    pub content_type: Option<String>,
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

impl ListQuery {
    pub fn parse(self) -> Result<ListParams, ApiError> {
        let status = match present(&self.status) {
            None => None,
            Some(text) => Some(JobStatus::parse(text).ok_or_else(|| {
                ApiError::validation(&["query", "status"], format!("unknown status {text:?}"))
            })?),
        };
        let content_type = present(&self.content_type)
            .map(ContentType::parse)
            .transpose()
            .map_err(|error| ApiError::invalid("query", error))?;
        let limit = bounded(
            self.limit.as_deref(),
            "limit",
            DEFAULT_LIST_LIMIT,
            1..=MAX_LIST_LIMIT,
            &format!("must be from 1 to {MAX_LIST_LIMIT}"),
        )?;
        // An empty cursor is the first page.
        let cursor = match present(&self.cursor) {
            None => None,
            Some(text) => Some(bounded(
                Some(text),
                "cursor",
                0,
                1..=i64::MAX,
                "not a cursor from a previous page",
            )?),
        };
        Ok(ListParams {
            status,
            content_type,
            limit,
            cursor,
        })
    }
}

#[derive(Deserialize)]
pub struct CleanupQuery {
    pub days_old: Option<String>,
}

impl CleanupQuery {
    /// The retention in days the admin asked for.
    pub fn parse(self) -> Result<u32, ApiError> {
        bounded(
            self.days_old.as_deref(),
            "days_old",
            DEFAULT_CLEANUP_DAYS,
            0..=MAX_CLEANUP_DAYS,
            &format!("must be a whole number of days from 0 to {MAX_CLEANUP_DAYS}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll(pairs: &[(&str, &str)]) -> Result<PollArgs, ApiError> {
        let field = |name: &str| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_string())
        };
        PollQuery {
            worker_id: field("worker_id"),
            content_types: field("content_types"),
            max_jobs: field("max_jobs"),
            wait: field("wait"),
        }
        .parse()
    }

    fn refused_field(result: Result<impl std::fmt::Debug, ApiError>) -> String {
        match result {
            Err(ApiError::Validation { location, .. }) => location.join("."),
            other => panic!("expected a 422, got {other:?}"),
        }
    }

    #[test]
    fn bounded_numbers_default_parse_and_refuse_outside_their_range() {
        let read = |raw| bounded(raw, "n", 7u32, 1..=10, "from 1 to 10");
        assert_eq!(read(None).unwrap(), 7);
        assert_eq!(read(Some(" 10 ")).unwrap(), 10);
        for bad in ["0", "11", "-1", "1.5", "abc", "", " "] {
            assert_eq!(refused_field(read(Some(bad))), "query.n", "{bad}");
        }
    }

    #[test]
    fn polls_parse_into_arguments() {
        let args = poll(&[
            ("worker_id", "gpu-1"),
            ("content_types", "audio, video,audio,,"),
            ("max_jobs", "5"),
            ("wait", "2.5"),
        ])
        .unwrap();
        assert_eq!(args.worker_id.as_str(), "gpu-1");
        assert_eq!(args.content_types.len(), 2, "blanks and duplicates dropped");
        assert_eq!(args.wait, Duration::from_millis(2500));
        assert_eq!(
            poll(&[("worker_id", "w")]).unwrap().wait,
            Duration::ZERO,
            "no wait by default"
        );
        assert_eq!(refused_field(poll(&[])), "query.worker_id");
        assert_eq!(
            refused_field(poll(&[("worker_id", "w"), ("max_jobs", "101")])),
            "query.max_jobs"
        );
        assert_eq!(
            refused_field(poll(&[("worker_id", "w"), ("wait", "31")])),
            "query.wait"
        );
        let many: Vec<String> = (0..33).map(|i| format!("t{i}")).collect();
        assert_eq!(
            refused_field(poll(&[
                ("worker_id", "w"),
                ("content_types", &many.join(","))
            ])),
            "query.content_types"
        );
    }

    #[test]
    fn listing_and_cleanup_queries_parse() {
        let list = |limit: Option<&str>, cursor: Option<&str>, status: Option<&str>| {
            ListQuery {
                status: status.map(str::to_owned),
                content_type: None,
                limit: limit.map(str::to_owned),
                cursor: cursor.map(str::to_owned),
            }
            .parse()
        };
        let params = list(None, None, Some("completed")).unwrap();
        assert_eq!(params.limit, 50);
        assert_eq!(params.status, Some(JobStatus::Completed));
        assert_eq!(list(Some("500"), Some("9"), None).unwrap().cursor, Some(9));
        assert_eq!(refused_field(list(Some("501"), None, None)), "query.limit");
        assert_eq!(refused_field(list(None, Some("0"), None)), "query.cursor");
        assert_eq!(
            refused_field(list(None, None, Some("bogus"))),
            "query.status"
        );
        let days = |raw: Option<&str>| {
            CleanupQuery {
                days_old: raw.map(str::to_owned),
            }
            .parse()
        };
        assert_eq!(days(None).unwrap(), 7);
        assert_eq!(days(Some("0")).unwrap(), 0);
        assert_eq!(refused_field(days(Some("36501"))), "query.days_old");
    }
}
