//! clap value parsers for settings, shared by `config` and `limits`. Each answers only the
//! form it expected; `cli::describe_invalid_value` puts the variable or flag the user set,
//! and the value, in front.

use std::net::SocketAddr;

/// Whole seconds: plain (`90`) or a duration (`90s`, `5m`, `1h`, `1h 30m`).
pub fn parse_seconds(text: &str) -> Result<u64, String> {
    const EXPECTED: &str = "expected whole seconds or a duration, e.g. 90, 90s, 5m or 1h";
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(seconds);
    }
    let duration = humantime::parse_duration(text).map_err(|_| EXPECTED.to_owned())?;
    if duration.subsec_nanos() != 0 {
        return Err(format!("{EXPECTED} (whole seconds only)"));
    }
    Ok(duration.as_secs())
}

/// A whole number such as a count of retries or connections.
pub fn parse_whole_number<T: std::str::FromStr>(text: &str) -> Result<T, String> {
    text.trim()
        .parse()
        .map_err(|_| "expected a whole number, e.g. 3".to_owned())
}

pub fn parse_days(text: &str) -> Result<u32, String> {
    text.trim()
        .parse()
        .map_err(|_| "expected a whole number of days, e.g. 7".to_owned())
}

/// HOST:PORT; a host name is resolved now, once, and its first address is used.
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    const EXPECTED: &str =
        "expected HOST:PORT, e.g. 127.0.0.1:8700, localhost:8700 or 0.0.0.0:8700";
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("no port: {EXPECTED}"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(EXPECTED.into());
    }
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|error| format!("cannot resolve {host:?} ({error}): {EXPECTED}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{host:?} has no address: {EXPECTED}"))
}
