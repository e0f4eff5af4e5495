//! Checked identifiers. Each is built by a constructor that validates it, and is then
//! trusted everywhere else ("parse, don't validate").

use std::fmt;

use uuid::Uuid;

/// Why a value could not become one of the identifiers below.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidValue {
    pub field: &'static str,
    pub message: String,
}

impl InvalidValue {
    pub fn new(field: &'static str, message: impl Into<String>) -> Self {
        InvalidValue {
            field,
            message: message.into(),
        }
    }
}

/// A job's public identifier: a UUID, as MoRAG's clients expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(Uuid);

impl JobId {
    pub fn new_random() -> Self {
        JobId(Uuid::new_v4())
    }

    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        Uuid::parse_str(text.trim())
            .map(JobId)
            .map_err(|_| InvalidValue::new("job_id", format!("{:?} is not a UUID", truncate(text))))
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// A fencing token handed out with each claim. A heartbeat or result that carries an
/// older lease than the job's current one is refused, so a worker whose attempt timed
/// out and was handed to someone else can never change the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(Uuid);

impl LeaseId {
    pub fn new_random() -> Self {
        LeaseId(Uuid::new_v4())
    }

    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        Uuid::parse_str(text.trim()).map(LeaseId).map_err(|_| {
            InvalidValue::new("lease_id", format!("{:?} is not a UUID", truncate(text)))
        })
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// A worker's self-chosen name: 1 to 128 printable characters without whitespace at the ends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkerId(String);

impl WorkerId {
    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        let trimmed = text.trim();
        if trimmed.is_empty() || trimmed.chars().count() > 128 {
            return Err(InvalidValue::new(
                "worker_id",
                "must be 1 to 128 characters",
            ));
        }
        if trimmed.chars().any(char::is_control) {
            return Err(InvalidValue::new(
                "worker_id",
                "must not contain control characters",
            ));
        }
        Ok(WorkerId(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What kind of conversion a job needs (`audio`, `video`, ...): lowercase `[a-z0-9_-]{1,32}`.
/// Unknown but well-formed types are allowed; they get the default timeout.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentType(String);

impl ContentType {
    pub fn parse(text: &str) -> Result<Self, InvalidValue> {
        let trimmed = text.trim();
        let well_formed = !trimmed.is_empty()
            && trimmed.len() <= 32
            && trimmed
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if well_formed {
            Ok(ContentType(trimmed.to_owned()))
        } else {
            Err(InvalidValue::new(
                "content_type",
                format!(
                    "{:?} must be lowercase [a-z0-9_-], 1 to 32 characters",
                    truncate(text)
                ),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Keeps error messages short when a client sends something huge.
fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_are_checked() {
        for good in ["audio", "video", "web-page", "x_1", &"a".repeat(32)] {
            assert!(ContentType::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "Audio", "a b", "a/b", "../x", &"a".repeat(33), "é"] {
            assert!(ContentType::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn job_ids_must_be_uuids() {
        let id = JobId::new_random();
        assert_eq!(JobId::parse(&id.to_string()), Ok(id));
        assert!(JobId::parse("../../etc").is_err());
        assert!(JobId::parse("").is_err());
    }

    #[test]
    fn worker_ids_are_bounded() {
        assert!(WorkerId::parse("gpu-worker-1").is_ok());
        assert!(WorkerId::parse("  ").is_err());
        assert!(WorkerId::parse(&"w".repeat(129)).is_err());
        assert!(WorkerId::parse("a\nb").is_err());
    }
}
