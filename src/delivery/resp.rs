//! A minimal Redis client: RESP2 over a tokio `TcpStream`, just enough for the Celery sink.
//!
//! It speaks the handful of commands the sink needs (`AUTH`, `SELECT`, `SCRIPT LOAD`,
//! `EVALSHA`, `EVAL`, plus whatever tests send), keeps a few idle connections for reuse, and
//! never reuses a connection after an IO error or a timeout: a reply that arrives late
//! would otherwise be read as the answer to the next command. A full client crate would
//! bring cluster, TLS and pub/sub support this server does not use.

use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Where the broker is: `redis://[[user]:password@]host[:port][/db]`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub db: u32,
    pub username: Option<String>,
    password: Option<String>,
}

impl RedisUrl {
    pub fn parse(text: &str) -> Result<RedisUrl, String> {
        let url = url::Url::parse(text).map_err(|e| format!("not a URL: {e}"))?;
        match url.scheme() {
            "redis" => {}
            "rediss" => return Err("rediss:// (TLS) is not supported; use redis://".into()),
            other => return Err(format!("unsupported scheme {other:?}; use redis://")),
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(address)) => address.to_string(),
            Some(url::Host::Domain("")) | None => return Err("the URL has no host".into()),
            Some(host) => host.to_string(),
        };
        let port = url.port().unwrap_or(6379);
        let path = url.path().trim_matches('/');
        let db = if path.is_empty() {
            0
        } else {
            path.parse::<u32>()
                .map_err(|_| format!("the database must be a number, not {path:?}"))?
        };
        let decode = |part: &str| {
            url::form_urlencoded::parse(format!("x={part}").as_bytes())
                .next()
                .map(|(_, value)| value.into_owned())
                .unwrap_or_default()
        };
        let username = Some(url.username()).filter(|u| !u.is_empty()).map(decode);
        let password = url.password().map(decode);
        Ok(RedisUrl {
            host,
            port,
            db,
            username,
            password,
        })
    }
}

/// Shows where the broker is, never its password.
impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = if self.password.is_some() { "***@" } else { "" };
        write!(f, "redis://{auth}{}:{}/{}", self.host, self.port, self.db)
    }
}

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Integer(i64),
    /// `None` for the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None` for the null array.
    Array(Option<Vec<Reply>>),
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("cannot reach redis at {0}: {1}")]
    Connect(String, #[source] std::io::Error),
    #[error("redis connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis sent something that is not RESP2: {0}")]
    Protocol(String),
    /// An error reply (`-ERR ...`); the connection stays usable.
    #[error("redis answered: {0}")]
    Server(String),
}

impl RedisError {
    /// Whether the connection that saw this error can be used again.
    fn connection_usable(&self) -> bool {
        matches!(self, RedisError::Server(_))
    }
}

/// A Lua script run by its SHA1 digest (`EVALSHA`), learnt from the server with
/// `SCRIPT LOAD` on first use; after `NOSCRIPT` (a restarted or flushed server) it is sent
/// whole once with `EVAL`, which caches it on the server again.
pub struct Script {
    source: &'static str,
    sha: Mutex<Option<String>>,
}

impl Script {
    pub const fn new(source: &'static str) -> Script {
        Script {
            source,
            sha: Mutex::new(None),
        }
    }
}

/// Connection settings and a small pool of idle connections.
pub struct RedisClient {
    url: RedisUrl,
    connect_timeout: Duration,
    io_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
}

impl RedisClient {
    pub fn new(url: RedisUrl, connect_timeout: Duration, io_timeout: Duration) -> RedisClient {
        RedisClient {
            url,
            connect_timeout,
            io_timeout,
            idle: Mutex::new(Vec::new()),
            max_idle: 16,
        }
    }

    pub fn url(&self) -> &RedisUrl {
        &self.url
    }

    /// Sends one command and reads its reply. An error reply is `RedisError::Server`.
    pub async fn command(&self, args: &[&[u8]]) -> Result<Reply, RedisError> {
        let (mut connection, _) = self.checkout().await?;
        let answer = connection.round_trip(args, self.io_timeout).await;
        self.checkin(connection, &answer);
        answer
    }

    /// Runs `script` with `keys` and `args`. The script must be safe to run twice: after
    /// an IO error on a pooled connection (say the server restarted since it was last
    /// used) the call is repeated once on a new connection, and a timed-out call may have
    /// run.
    pub async fn run_script(
        &self,
        script: &Script,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<Reply, RedisError> {
        let (mut connection, reused) = self.checkout().await?;
        let mut answer = self
            .run_script_on(&mut connection, script, keys, args)
            .await;
        if reused && matches!(answer, Err(RedisError::Io(_))) {
            connection = Connection::open(&self.url, self.connect_timeout, self.io_timeout).await?;
            answer = self
                .run_script_on(&mut connection, script, keys, args)
                .await;
        }
        self.checkin(connection, &answer);
        answer
    }

    async fn run_script_on(
        &self,
        connection: &mut Connection,
        script: &Script,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<Reply, RedisError> {
        let known_sha = script.sha.lock().unwrap().clone();
        let sha = match known_sha {
            Some(sha) => sha,
            None => {
                let reply = connection
                    .round_trip(
                        &[b"SCRIPT", b"LOAD", script.source.as_bytes()],
                        self.io_timeout,
                    )
                    .await?;
                let Reply::Bulk(Some(sha)) = reply else {
                    return Err(RedisError::Protocol(format!(
                        "SCRIPT LOAD answered {reply:?}"
                    )));
                };
                let sha = String::from_utf8(sha)
                    .map_err(|_| RedisError::Protocol("SCRIPT LOAD answered non-UTF-8".into()))?;
                *script.sha.lock().unwrap() = Some(sha.clone());
                sha
            }
        };
        let n_keys = keys.len().to_string();
        let mut command: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
        command.extend([b"EVALSHA".as_slice(), sha.as_bytes(), n_keys.as_bytes()]);
        command.extend_from_slice(keys);
        command.extend_from_slice(args);
        match connection.round_trip(&command, self.io_timeout).await {
            Err(RedisError::Server(message)) if message.starts_with("NOSCRIPT") => {
                command[0] = b"EVAL";
                command[1] = script.source.as_bytes();
                connection.round_trip(&command, self.io_timeout).await
            }
            answer => answer,
        }
    }

    /// An idle connection, or a new one; `true` when it was reused.
    async fn checkout(&self) -> Result<(Connection, bool), RedisError> {
        if let Some(connection) = self.idle.lock().unwrap().pop() {
            return Ok((connection, true));
        }
        let connection = Connection::open(&self.url, self.connect_timeout, self.io_timeout).await?;
        Ok((connection, false))
    }

    fn checkin<T>(&self, connection: Connection, answer: &Result<T, RedisError>) {
        let usable = match answer {
            Ok(_) => true,
            Err(error) => error.connection_usable(),
        };
        let mut idle = self.idle.lock().unwrap();
        if usable && idle.len() < self.max_idle {
            idle.push(connection);
        }
    }
}

/// Arguments at least this long are written straight from the caller's buffer rather than
/// copied into the command buffer (a task message may carry tens of megabytes).
const COPY_LIMIT: usize = 16 * 1024;

struct Connection {
    stream: BufReader<TcpStream>,
}

impl Connection {
    async fn open(
        url: &RedisUrl,
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> Result<Connection, RedisError> {
        let address = format!("{}:{}", url.host, url.port);
        let stream = match tokio::time::timeout(
            connect_timeout,
            TcpStream::connect((url.host.as_str(), url.port)),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(RedisError::Connect(address, error)),
            Err(_) => return Err(RedisError::Timeout(connect_timeout)),
        };
        stream.set_nodelay(true)?;
        let mut connection = Connection {
            stream: BufReader::new(stream),
        };
        if let Some(password) = &url.password {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(username) = &url.username {
                auth.push(username.as_bytes());
            }
            auth.push(password.as_bytes());
            connection.round_trip(&auth, io_timeout).await?;
        }
        if url.db != 0 {
            let db = url.db.to_string();
            connection
                .round_trip(&[b"SELECT", db.as_bytes()], io_timeout)
                .await?;
        }
        Ok(connection)
    }

    async fn round_trip(&mut self, args: &[&[u8]], timeout: Duration) -> Result<Reply, RedisError> {
        match tokio::time::timeout(timeout, async {
            self.write_command(args).await?;
            read_reply(&mut self.stream).await
        })
        .await
        {
            Ok(answer) => answer,
            Err(_) => Err(RedisError::Timeout(timeout)),
        }
    }

    async fn write_command(&mut self, args: &[&[u8]]) -> Result<(), RedisError> {
        let stream = self.stream.get_mut();
        let mut buffer = Vec::with_capacity(256);
        buffer.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            buffer.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            if arg.len() >= COPY_LIMIT {
                stream.write_all(&buffer).await?;
                buffer.clear();
                stream.write_all(arg).await?;
            } else {
                buffer.extend_from_slice(arg);
            }
            buffer.extend_from_slice(b"\r\n");
        }
        stream.write_all(&buffer).await?;
        stream.flush().await?;
        Ok(())
    }
}

/// Reads one reply; nested arrays by recursion (boxed, as async recursion must be).
fn read_reply<'a>(
    stream: &'a mut BufReader<TcpStream>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Reply, RedisError>> + Send + 'a>> {
    Box::pin(async move {
        let mut line = Vec::new();
        stream.read_until(b'\n', &mut line).await?;
        if line.is_empty() {
            return Err(RedisError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if !line.ends_with(b"\r\n") {
            return Err(RedisError::Protocol("a line without CRLF".into()));
        }
        line.truncate(line.len() - 2);
        let (kind, rest) = (line[0], String::from_utf8_lossy(&line[1..]).into_owned());
        let number = || {
            rest.parse::<i64>()
                .map_err(|_| RedisError::Protocol(format!("expected a number, got {rest:?}")))
        };
        match kind {
            b'+' => Ok(Reply::Status(rest)),
            b'-' => Err(RedisError::Server(rest)),
            b':' => Ok(Reply::Integer(number()?)),
            b'$' => {
                let length = number()?;
                if length < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut data = vec![0; length as usize + 2];
                stream.read_exact(&mut data).await?;
                data.truncate(length as usize);
                Ok(Reply::Bulk(Some(data)))
            }
            b'*' => {
                let length = number()?;
                if length < 0 {
                    return Ok(Reply::Array(None));
                }
                let mut items = Vec::with_capacity(length.min(1024) as usize);
                for _ in 0..length {
                    items.push(read_reply(stream).await?);
                }
                Ok(Reply::Array(Some(items)))
            }
            other => Err(RedisError::Protocol(format!(
                "unknown reply type {:?}",
                other as char
            ))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_host_port_database_and_credentials() {
        let url = RedisUrl::parse("redis://127.0.0.1:6380/3").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.db),
            ("127.0.0.1", 6380, 3)
        );
        assert_eq!((url.username.clone(), url.password.clone()), (None, None));

        let url = RedisUrl::parse("redis://localhost").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.db),
            ("localhost", 6379, 0)
        );

        let url = RedisUrl::parse("redis://:p%40ss@[::1]:7000/1").unwrap();
        assert_eq!((url.host.as_str(), url.port, url.db), ("::1", 7000, 1));
        assert_eq!(url.password.as_deref(), Some("p@ss"));
        assert_eq!(url.username, None);

        let url = RedisUrl::parse("redis://ingest:secret@broker/0").unwrap();
        assert_eq!(url.username.as_deref(), Some("ingest"));
        assert_eq!(format!("{url:?}"), "redis://***@broker:6379/0");
    }

    #[test]
    fn urls_that_cannot_work_are_refused() {
        for text in [
            "rediss://host",
            "http://host",
            "redis://host/x",
            "redis:///0",
            "host:6379",
        ] {
            assert!(RedisUrl::parse(text).is_err(), "{text} was accepted");
        }
    }
}
