//! Parsing the free-form JSON of requests (`metadata`, `task_options`) and result
//! `content` within the configured limits, checked while parsing: a value fails at the
//! first key past the entry limit, the first level past the depth limit or the first byte
//! past the size limit, before the rest is built. serde_json's tree costs about a hundred
//! bytes per key, so without the entry limit 84 MB of small keys became 1.9 GB.
//!
//! Field deserializers cannot take arguments, so the request extractor installs the
//! limits for the duration of one (synchronous) parse in a thread-local, and reads back
//! which limit, if any, was exceeded; outside such a parse the default limits apply.
//!
//! It lives with the wire types because their derived parsers name these field
//! deserializers; the server installs its configured limits around each request's parse.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Limits on one JSON value from a request (`metadata`, `task_options`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonLimits {
    pub max_bytes: u64,
    pub max_depth: u32,
    pub max_entries: u64,
}

/// The limits of the parse in progress on this thread, and the first one exceeded.
struct ActiveParse {
    json: JsonLimits,
    max_content_bytes: u64,
    exceeded: Option<String>,
}

thread_local! {
    static ACTIVE: RefCell<Option<ActiveParse>> = const { RefCell::new(None) };
}

const DEFAULT_JSON_LIMITS: JsonLimits = JsonLimits {
    max_bytes: 1024 * 1024,
    max_depth: 32,
    max_entries: 100_000,
};
const DEFAULT_MAX_CONTENT_BYTES: u64 = 64 * 1024 * 1024;

/// Runs `parse` with these limits; returns its result and the message of the first limit
/// exceeded, if any (the parse then failed).
pub fn with_limits<R>(
    json: JsonLimits,
    max_content_bytes: u64,
    parse: impl FnOnce() -> R,
) -> (R, Option<String>) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ACTIVE.with(|active| active.borrow_mut().take());
        }
    }
    ACTIVE.with(|active| {
        *active.borrow_mut() = Some(ActiveParse {
            json,
            max_content_bytes,
            exceeded: None,
        })
    });
    let reset = Reset;
    let result = parse();
    let exceeded = ACTIVE.with(|active| {
        active
            .borrow_mut()
            .as_mut()
            .and_then(|parse| parse.exceeded.take())
    });
    drop(reset);
    (result, exceeded)
}

fn current_limits() -> (JsonLimits, u64) {
    ACTIVE.with(|active| match active.borrow().as_ref() {
        Some(parse) => (parse.json, parse.max_content_bytes),
        None => (DEFAULT_JSON_LIMITS, DEFAULT_MAX_CONTENT_BYTES),
    })
}

/// Records the exceeded limit and returns the error that stops the parse.
fn exceeded<E: de::Error>(message: String) -> E {
    ACTIVE.with(|active| {
        if let Some(parse) = active.borrow_mut().as_mut() {
            parse.exceeded.get_or_insert_with(|| message.clone());
        }
    });
    E::custom(message)
}

/// Result `content`: a string of at most `MORAG_REMOTE_MAX_RESULT_BYTES`, or null.
pub fn content<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    let content: Option<String> = serde::Deserialize::deserialize(deserializer)?;
    let (_, max) = current_limits();
    match content {
        Some(text) if text.len() as u64 > max => Err(exceeded(format!(
            "content is larger than {max} bytes (MORAG_REMOTE_MAX_RESULT_BYTES)"
        ))),
        other => Ok(other),
    }
}

/// Result `metadata`: an object within the limits, or null.
pub fn metadata<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Map<String, Value>>, D::Error> {
    deserializer.deserialize_option(OptionalObject { field: "metadata" })
}

/// Job `task_options`: an object within the limits (null is refused).
pub fn task_options<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Map<String, Value>, D::Error> {
    object("task_options", deserializer)
}

fn object<'de, D: Deserializer<'de>>(
    field: &'static str,
    deserializer: D,
) -> Result<Map<String, Value>, D::Error> {
    let (limits, _) = current_limits();
    let budget = RefCell::new(Budget {
        field,
        limits,
        bytes: 0,
        entries: 0,
    });
    let value = Bounded {
        budget: &budget,
        depth: 0,
    }
    .deserialize(deserializer)?;
    match value {
        Value::Object(map) => Ok(map),
        other => Err(de::Error::invalid_type(
            unexpected(&other),
            &"a JSON object",
        )),
    }
}

fn unexpected(value: &Value) -> de::Unexpected<'_> {
    match value {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(_) => de::Unexpected::Other("number"),
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

struct OptionalObject {
    field: &'static str,
}

impl<'de> Visitor<'de> for OptionalObject {
    type Value = Option<Map<String, Value>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        object(self.field, deserializer).map(Some)
    }
}

/// What one value has used so far: bytes as compact JSON, and keys plus array elements.
struct Budget {
    field: &'static str,
    limits: JsonLimits,
    bytes: u64,
    entries: u64,
}

impl Budget {
    fn spend<E: de::Error>(&mut self, bytes: u64) -> Result<(), E> {
        self.bytes += bytes;
        if self.bytes > self.limits.max_bytes {
            return Err(exceeded(format!(
                "{} is larger than {} bytes as JSON (MORAG_REMOTE_MAX_METADATA_BYTES)",
                self.field, self.limits.max_bytes
            )));
        }
        Ok(())
    }

    fn count_entry<E: de::Error>(&mut self) -> Result<(), E> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(exceeded(format!(
                "{} has more than {} keys and array elements (MORAG_REMOTE_MAX_JSON_ENTRIES)",
                self.field, self.limits.max_entries
            )));
        }
        Ok(())
    }

    fn enter<E: de::Error>(&self, depth: u32) -> Result<(), E> {
        if depth > self.limits.max_depth {
            return Err(exceeded(format!(
                "{} is nested deeper than {} levels (MORAG_REMOTE_MAX_JSON_DEPTH)",
                self.field, self.limits.max_depth
            )));
        }
        Ok(())
    }
}

/// The length of `text` as a JSON string, quotes and escapes included (as serde_json
/// writes it).
fn json_string_len(text: &str) -> u64 {
    let escapes: u64 = text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            0..=0x1f => 5,
            _ => 0,
        })
        .sum();
    text.len() as u64 + escapes + 2
}

/// The length of a number as written with `Display`, without allocating.
fn display_len(value: impl fmt::Display) -> u64 {
    struct Count(u64);
    impl fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0 += s.len() as u64;
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = fmt::write(&mut count, format_args!("{value}"));
    count.0
}

/// One value at `depth` (the object itself is at depth 1), charged to `budget`.
#[derive(Clone, Copy)]
struct Bounded<'a> {
    budget: &'a RefCell<Budget>,
    depth: u32,
}

impl<'de> DeserializeSeed<'de> for Bounded<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Bounded<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, value: bool) -> Result<Value, E> {
        self.budget.borrow_mut().spend(if value { 4 } else { 5 })?;
        Ok(Value::Bool(value))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Value, E> {
        self.budget.borrow_mut().spend(display_len(value))?;
        Ok(Value::from(value))
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<Value, E> {
        self.budget.borrow_mut().spend(display_len(value))?;
        Ok(Value::from(value))
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<Value, E> {
        // serde_json writes the shorter of the plain and the exponent form ("1.5e+300").
        let written = display_len(value).min(display_len(format_args!("{value:e}")) + 1);
        self.budget.borrow_mut().spend(written)?;
        Ok(serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Value, E> {
        self.budget.borrow_mut().spend(json_string_len(value))?;
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E: de::Error>(self, value: String) -> Result<Value, E> {
        self.budget.borrow_mut().spend(json_string_len(&value))?;
        Ok(Value::String(value))
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.budget.borrow_mut().spend(4)?;
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = Bounded {
            budget: self.budget,
            depth: self.depth + 1,
        };
        {
            let mut budget = self.budget.borrow_mut();
            budget.enter(inner.depth)?;
            budget.spend(2)?;
        }
        let mut elements = Vec::new();
        while let Some(element) = seq.next_element_seed(inner)? {
            let mut budget = self.budget.borrow_mut();
            budget.count_entry()?;
            if !elements.is_empty() {
                budget.spend(1)?;
            }
            elements.push(element);
        }
        Ok(Value::Array(elements))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let inner = Bounded {
            budget: self.budget,
            depth: self.depth + 1,
        };
        {
            let mut budget = self.budget.borrow_mut();
            budget.enter(inner.depth)?;
            budget.spend(2)?;
        }
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            {
                let mut budget = self.budget.borrow_mut();
                budget.count_entry()?;
                // The key, its colon, and the comma before every entry but the first.
                budget.spend(json_string_len(&key) + 1 + u64::from(!map.is_empty()))?;
            }
            let value = access.next_value_seed(inner)?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    struct Request {
        #[serde(default, deserialize_with = "metadata")]
        metadata: Option<Map<String, Value>>,
    }

    fn parse(
        json: &str,
        limits: JsonLimits,
    ) -> (Result<Request, serde_json::Error>, Option<String>) {
        with_limits(limits, 100, || serde_json::from_str::<Request>(json))
    }

    const LIMITS: JsonLimits = JsonLimits {
        max_bytes: 1000,
        max_depth: 3,
        max_entries: 10,
    };

    #[test]
    fn counts_bytes_as_compact_json() {
        for text in [
            r#"{"a":1,"b":[true,false,null,"x\n\"y"],"c":{"d":-1.5e300}}"#,
            r#"{}"#,
            r#"{"k":"\u0001"}"#,
        ] {
            let value: Value = serde_json::from_str(text).unwrap();
            let compact = value.to_string();
            let budget = RefCell::new(Budget {
                field: "metadata",
                limits: LIMITS,
                bytes: 0,
                entries: 0,
            });
            let mut deserializer = serde_json::Deserializer::from_str(text);
            let parsed = Bounded {
                budget: &budget,
                depth: 0,
            }
            .deserialize(&mut deserializer)
            .unwrap();
            assert_eq!(parsed, value);
            assert_eq!(budget.borrow().bytes, compact.len() as u64, "{compact}");
        }
    }

    #[test]
    fn refuses_values_over_each_limit_and_names_it() {
        let (ok, exceeded) = parse(r#"{"metadata": {"a": [1, {"b": 2}]}}"#, LIMITS);
        assert!(ok.unwrap().metadata.is_some() && exceeded.is_none());
        let (ok, exceeded) = parse(r#"{"metadata": null}"#, LIMITS);
        assert!(ok.unwrap().metadata.is_none() && exceeded.is_none());
        let wide = format!(
            r#"{{"metadata": {{{}}}}}"#,
            (0..11)
                .map(|i| format!(r#""k{i}":0"#))
                .collect::<Vec<_>>()
                .join(",")
        );
        for (json, variable) in [
            (wide.as_str(), "MORAG_REMOTE_MAX_JSON_ENTRIES"),
            (
                r#"{"metadata": {"a": [[[1]]]}}"#,
                "MORAG_REMOTE_MAX_JSON_DEPTH",
            ),
            (
                &*format!(r#"{{"metadata": {{"a": "{}"}}}}"#, "x".repeat(1000)),
                "MORAG_REMOTE_MAX_METADATA_BYTES",
            ),
        ] {
            let (result, exceeded) = parse(json, LIMITS);
            assert!(result.is_err(), "{json}");
            assert!(exceeded.unwrap().contains(variable), "{json}");
        }
        let (result, exceeded) = parse(r#"{"metadata": [1]}"#, LIMITS);
        assert!(
            result.is_err() && exceeded.is_none(),
            "a type error is no limit"
        );
    }
}
