//! L4: a [`BlockStore`] on a Valkey or Redis server, shared by every kvalloc instance that
//! points at it (scale-out: one instance's demoted prefixes are another's hits).
//!
//! # On the wire
//!
//! One string value per record:
//!
//! ```text
//! key   = "<prefix>:<namespace:016x>:<id:016x>:<group>"
//! value = RecordHeader (magic, version, key, geometry, layer tags, header tag) ++ payload
//! ```
//!
//! The payload is layer-major, so layer `i` is the byte range
//! `[header_len + i * layer_bytes, header_len + (i + 1) * layer_bytes)` and a layer range is
//! one `GETRANGE`. The namespace (a digest of the model identity, geometry and block size)
//! keeps models apart; the id is a keyed one-way function of the block's chained hash
//! ([`RecordKeys`]), and the chain is seeded from the tenant salt, which keeps tenants apart
//! without a key revealing a chain. The prefix defaults to `kvalloc-<tag>`, the tag naming the
//! namespace and the deployment secret ([`RecordKeys::tag`]): instances share records only
//! when they serve the same model with the same secret. The header repeats namespace and key,
//! and every read checks the header's tag and each layer's, so foreign, damaged, substituted
//! or (with a secret) forged values are reported as [`StoreError::Corrupt`], never returned.
//!
//! Commands are RESP-encoded here into one reusable buffer and sent as one pipeline per call
//! (`SET` for [`put_many`](BlockStore::put_many), `EXISTS` for
//! [`contains_many`](BlockStore::contains_many)), split so that no pipeline carries more than
//! [`RemoteConfig::max_batch_bytes`]. The `redis` crate does the connection, the `AUTH`
//! handshake (password or ACL user), and the reply parsing.
//!
//! # Faults
//!
//! - Every socket operation has a deadline ([`RemoteConfig::connect_timeout`],
//!   [`RemoteConfig::io_timeout`]); a server that is down or killed mid-call yields
//!   [`StoreError::Unavailable`] and counts `unavailable`, never a panic or a long hang.
//! - After a connection fails, it is dropped and rebuilt on a later call. Attempts are spaced
//!   by [`RemoteConfig::reconnect_interval`], doubling per consecutive failure up to
//!   [`RemoteConfig::max_reconnect_interval`]; between attempts calls fail at once, so a dead
//!   or hung server does not slow every scheduler step. A failed call counts `unavailable`
//!   once (a failed `put_many` returns `Unavailable` for each of its records).
//! - A server out of memory (`OOM` reply, `maxmemory` with `noeviction`) is
//!   [`StoreError::Full`] for that record (`writes_skipped_full`).
//! - A wrong password or ACL user is `Unavailable` with "authentication failed" in its message.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use redis::{ConnectionLike, ErrorKind, IntoConnectionInfo, RedisError, Value};

use super::keys::{RecordKeys, Secret};
use super::store::{
    BlockKey, BlockStore, RecordHeader, StoreCounters, StoreError, HEADER_FIXED_BYTES,
    LAYERS_OFFSET,
};
use crate::Error;

/// Settings of a [`RemoteStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    /// `redis://[[user]:password@]host:port[/db]` (also `valkey://`).
    pub url: String,
    /// ACL user name; overrides one given in the URL.
    pub username: Option<String>,
    /// Password (for `requirepass` or the ACL user); overrides one given in the URL.
    pub password: Option<String>,
    /// First component of every key, so a shared server can host other data. None: derived
    /// from the namespace and the secret (`kvalloc-<tag>`, see the module docs).
    pub key_prefix: Option<String>,
    /// Namespace digest (model identity, geometry and block size).
    pub namespace: u64,
    /// Deployment secret: keys record ids and authenticates records (None: ids keyed by a
    /// public key, records checked but not authenticated).
    pub secret: Option<Secret>,
    /// Deadline for TCP connect plus the handshake.
    pub connect_timeout: Duration,
    /// Deadline for each socket read or write.
    pub io_timeout: Duration,
    /// Least time between two connection attempts after a failure; doubles with each
    /// consecutive failed attempt, up to [`max_reconnect_interval`](Self::max_reconnect_interval).
    pub reconnect_interval: Duration,
    /// Cap of the reconnect back-off (a hung server costs one `connect_timeout` per attempt).
    pub max_reconnect_interval: Duration,
    /// Most bytes of commands in one pipeline (bounds the client's buffer).
    pub max_batch_bytes: usize,
    /// Read layer ranges with `GETRANGE` (header and range in one pipeline) rather than `GET`
    /// of the whole value. Only the layers asked for cross the wire.
    pub range_reads: bool,
}

impl RemoteConfig {
    /// Defaults: derived prefix, no secret, 200 ms connect, 1 s per socket operation, reconnect
    /// attempts 100 ms apart doubling up to 2 s, 64 MiB pipelines, range reads.
    pub fn new(url: impl Into<String>, namespace: u64) -> Self {
        RemoteConfig {
            url: url.into(),
            username: None,
            password: None,
            key_prefix: None,
            namespace,
            secret: None,
            connect_timeout: Duration::from_millis(200),
            io_timeout: Duration::from_secs(1),
            reconnect_interval: Duration::from_millis(100),
            max_reconnect_interval: Duration::from_secs(2),
            max_batch_bytes: 64 << 20,
            range_reads: true,
        }
    }
}

/// Remote store on a Valkey/Redis server. See the module docs for the format and fault model.
pub struct RemoteStore {
    cfg: RemoteConfig,
    keys: RecordKeys,
    /// The key prefix in use (given or derived).
    prefix: String,
    client: redis::Client,
    conn: Option<redis::Connection>,
    /// No connection attempt before this instant (set after a failure).
    retry_at: Option<Instant>,
    /// Why the last connection failed, for the next `Unavailable` message.
    last_failure: String,
    /// Consecutive failures since the last good connection (sets the back-off).
    failures: u32,
    counters: StoreCounters,
    /// Layers and layer bytes last seen per group, so a range read is one round trip.
    geometry: HashMap<u16, (u32, u32)>,
    /// Reused RESP buffer and header scratch.
    buf: Vec<u8>,
    header_buf: Vec<u8>,
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore")
            .field("key_prefix", &self.prefix)
            .field("keys", &self.keys)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

impl RemoteStore {
    /// Validates `cfg` and tries to connect once. A server that cannot be reached (or refuses
    /// the credentials) is not an error here: calls return `Unavailable` until it can be.
    /// Errors: a malformed URL or zero timeouts (`InvalidArgument`).
    pub fn open(cfg: RemoteConfig) -> Result<RemoteStore, Error> {
        let bad = |what: &str, message: String| Error::InvalidArgument {
            what: what.into(),
            message,
        };
        let mut info = cfg
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| bad("url", format!("{:?}: {e}", redact(&cfg.url))))?;
        if !matches!(info.addr, redis::ConnectionAddr::Tcp(..)) {
            return Err(bad(
                "url",
                "only redis:// (plain TCP) addresses are supported".into(),
            ));
        }
        if cfg.username.is_some() {
            info.redis.username = cfg.username.clone();
        }
        if cfg.password.is_some() {
            info.redis.password = cfg.password.clone();
        }
        for (what, d) in [
            ("connect_timeout", cfg.connect_timeout),
            ("io_timeout", cfg.io_timeout),
        ] {
            if d.is_zero() {
                return Err(bad(what, "must be positive".into()));
            }
        }
        let keys = RecordKeys::new(cfg.namespace, cfg.secret.as_ref());
        let prefix = match &cfg.key_prefix {
            Some(p) if p.is_empty() || p.contains(char::is_whitespace) => {
                return Err(bad(
                    "key_prefix",
                    format!("{p:?} must be non-empty, without spaces"),
                ));
            }
            Some(p) => p.clone(),
            None => format!("kvalloc-{:016x}", keys.tag()),
        };
        let client = redis::Client::open(info).map_err(|e| bad("url", e.to_string()))?;
        let mut store = RemoteStore {
            cfg,
            keys,
            prefix,
            client,
            conn: None,
            retry_at: None,
            last_failure: String::new(),
            failures: 0,
            counters: StoreCounters::default(),
            geometry: HashMap::new(),
            buf: Vec::new(),
            header_buf: Vec::new(),
        };
        let _ = store.connection();
        Ok(store)
    }

    /// [`open`](Self::open), then a `PING`: fails with the reason when the server cannot be
    /// reached or refuses the credentials.
    pub fn connect(cfg: RemoteConfig) -> Result<RemoteStore, Error> {
        let mut store = Self::open(cfg)?;
        store.ping().map_err(|e| Error::InvalidArgument {
            what: "url".into(),
            message: format!("{}: {e}", redact(&store.cfg.url)),
        })?;
        Ok(store)
    }

    /// Round trip to the server (connecting if needed).
    pub fn ping(&mut self) -> Result<(), StoreError> {
        self.buf.clear();
        push_command(&mut self.buf, &[b"PING"]);
        match self.exchange(1)?.pop().expect("1 reply") {
            Value::ServerError(e) => Err(self.server_error(e.into())),
            _ => Ok(()),
        }
    }

    /// Whether a connection is currently open.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The settings.
    pub fn config(&self) -> &RemoteConfig {
        &self.cfg
    }

    /// The key prefix in use (given, or derived from the namespace and the secret).
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    /// The server key of a record.
    pub fn key(&self, key: BlockKey) -> String {
        format!(
            "{}:{:016x}:{:016x}:{}",
            self.prefix,
            self.keys.namespace(),
            key.hash,
            key.group
        )
    }

    /// The open connection, or a new one if the rate limit allows an attempt.
    fn connection(&mut self) -> Result<&mut redis::Connection, StoreError> {
        if self.conn.is_none() {
            let now = Instant::now();
            if let Some(at) = self.retry_at {
                if now < at {
                    return Err(StoreError::Unavailable(format!(
                        "not connected ({}); next attempt in {} ms",
                        self.last_failure,
                        (at - now).as_millis()
                    )));
                }
            }
            let conn = self
                .client
                .get_connection_with_timeout(self.cfg.connect_timeout)
                .and_then(|c| {
                    c.set_read_timeout(Some(self.cfg.io_timeout))?;
                    c.set_write_timeout(Some(self.cfg.io_timeout))?;
                    Ok(c)
                });
            match conn {
                Ok(c) => {
                    self.conn = Some(c);
                    self.retry_at = None;
                    self.failures = 0;
                }
                Err(e) => {
                    self.schedule_retry(describe(&e));
                    return Err(StoreError::Unavailable(self.last_failure.clone()));
                }
            }
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// Sends the `n` commands in `self.buf` and returns their replies (server errors as
    /// `Value::ServerError`). A transport failure drops the connection: `Unavailable`.
    fn exchange(&mut self, n: usize) -> Result<Vec<Value>, StoreError> {
        if let Err(e) = self.connection() {
            self.counters.unavailable += 1;
            return Err(e);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let result = conn.req_packed_commands(&self.buf, 0, n);
        match result {
            Ok(values) if values.len() == n => Ok(values),
            Ok(values) => {
                Err(self.transport_failure(format!("expected {n} replies, got {}", values.len())))
            }
            Err(e) => Err(self.transport_failure(describe(&e))),
        }
    }

    /// Drops the connection (its stream state is unknown) and schedules the next attempt.
    fn transport_failure(&mut self, why: String) -> StoreError {
        self.conn = None;
        self.schedule_retry(why.clone());
        self.counters.unavailable += 1;
        StoreError::Unavailable(why)
    }

    /// No attempt before `reconnect_interval * 2^(failures - 1)` (capped) from now.
    fn schedule_retry(&mut self, why: String) {
        let backoff = self
            .cfg
            .reconnect_interval
            .saturating_mul(1 << self.failures.min(16))
            .min(
                self.cfg
                    .max_reconnect_interval
                    .max(self.cfg.reconnect_interval),
            );
        self.failures = self.failures.saturating_add(1);
        self.retry_at = Some(Instant::now() + backoff);
        self.last_failure = why;
    }

    /// Classifies one command's server error reply.
    fn server_error(&mut self, e: RedisError) -> StoreError {
        match e.code() {
            Some("OOM") => {
                self.counters.writes_skipped_full += 1;
                StoreError::Full(describe(&e))
            }
            Some("NOAUTH") | Some("WRONGPASS") | Some("NOPERM") => {
                self.counters.unavailable += 1;
                StoreError::Unavailable(format!("authentication failed: {}", describe(&e)))
            }
            _ => {
                self.counters.io_errors += 1;
                StoreError::Io(describe(&e))
            }
        }
    }

    /// Reads layers with `GETRANGE`: header and range in one pipeline when the group's
    /// geometry is known, else the header first.
    fn range_read(
        &mut self,
        key: BlockKey,
        first_layer: u32,
        dst: &mut [u8],
    ) -> Result<(), StoreError> {
        let rkey = self.key(key);
        let guess = self.geometry.get(&key.group).copied();
        let header_len = |layers: u32| HEADER_FIXED_BYTES + 8 * layers as usize;
        if let Some((layers, lb)) = guess {
            let fits = dst.len() % lb as usize == 0
                && first_layer as usize + dst.len() / lb as usize <= layers as usize;
            if fits {
                let start = header_len(layers) + first_layer as usize * lb as usize;
                self.buf.clear();
                push_getrange(&mut self.buf, &rkey, 0, header_len(layers));
                push_getrange(&mut self.buf, &rkey, start, dst.len());
                let mut replies = self.exchange(2)?.into_iter();
                let head = self.bulk(replies.next().expect("2 replies"))?;
                // A record of another geometry than the guess (its header may be longer than
                // what was fetched) falls through to the exact path below.
                if let Ok(header) = RecordHeader::decode(&head, &self.keys) {
                    if (header.layers(), header.layer_bytes) == (layers, lb) {
                        header.check(self.keys.namespace(), key)?;
                        let body = self.bulk(replies.next().expect("2 replies"))?;
                        return finish_read(&self.keys, &header, first_layer, &body, dst);
                    }
                }
            }
        }
        self.buf.clear();
        push_getrange(&mut self.buf, &rkey, 0, header_len(PROBE_LAYERS));
        let head = self.single_bulk()?;
        let mut header = self.decode_header(&head, key);
        if let Err(StoreError::Corrupt(_)) = header {
            // Over PROBE_LAYERS layers: fetch the exact header length.
            if head.len() >= HEADER_FIXED_BYTES {
                let at = LAYERS_OFFSET;
                let layers =
                    u32::from_le_bytes(head[at..at + 4].try_into().expect("4")).min(1 << 16);
                self.buf.clear();
                push_getrange(&mut self.buf, &rkey, 0, header_len(layers));
                let head = self.single_bulk()?;
                header = self.decode_header(&head, key);
            }
        }
        let header = header?;
        let lb = header.layer_bytes as usize;
        header.check_range(first_layer, dst.len())?;
        self.buf.clear();
        push_getrange(
            &mut self.buf,
            &rkey,
            header.encoded_len() + first_layer as usize * lb,
            dst.len(),
        );
        let body = self.single_bulk()?;
        finish_read(&self.keys, &header, first_layer, &body, dst)
    }

    /// Reads the whole value with `GET`, then verifies and copies the range.
    fn whole_read(
        &mut self,
        key: BlockKey,
        first_layer: u32,
        dst: &mut [u8],
    ) -> Result<(), StoreError> {
        let rkey = self.key(key);
        self.buf.clear();
        push_command(&mut self.buf, &[b"GET", rkey.as_bytes()]);
        let value = self.single_bulk()?;
        let header = self.decode_header(&value, key)?;
        header.check_range(first_layer, dst.len())?;
        let start = header.encoded_len() + first_layer as usize * header.layer_bytes as usize;
        let body = value.get(start..start + dst.len()).unwrap_or(&[]);
        finish_read(&self.keys, &header, first_layer, body, dst)
    }

    fn single_bulk(&mut self) -> Result<Vec<u8>, StoreError> {
        let reply = self.exchange(1)?.pop().expect("1 reply");
        self.bulk(reply)
    }

    /// A bulk-string reply; nil or empty (a missing key's `GETRANGE`) is `Missing`.
    fn bulk(&mut self, v: Value) -> Result<Vec<u8>, StoreError> {
        match v {
            Value::BulkString(b) if !b.is_empty() => Ok(b),
            Value::BulkString(_) | Value::Nil => Err(StoreError::Missing),
            Value::ServerError(e) => Err(self.server_error(e.into())),
            other => {
                self.counters.io_errors += 1;
                Err(StoreError::Io(format!("unexpected reply {other:?}")))
            }
        }
    }

    fn decode_header(&mut self, head: &[u8], key: BlockKey) -> Result<RecordHeader, StoreError> {
        let header = RecordHeader::decode(head, &self.keys).and_then(|h| {
            h.check(self.keys.namespace(), key)?;
            Ok(h)
        })?;
        self.geometry
            .insert(key.group, (header.layers(), header.layer_bytes));
        Ok(header)
    }

    fn count_read(&mut self, r: &Result<(), StoreError>, bytes: usize) {
        match r {
            Ok(()) => {
                self.counters.gets += 1;
                self.counters.bytes_read += bytes as u64;
            }
            Err(StoreError::Corrupt(_)) => self.counters.checksum_failures += 1,
            Err(_) => {} // counted where classified
        }
    }
}

impl BlockStore for RemoteStore {
    fn name(&self) -> &'static str {
        "remote"
    }

    fn put(&mut self, key: BlockKey, layer_bytes: u32, data: &[u8]) -> Result<(), StoreError> {
        self.put_many(&[(key, layer_bytes, data)])
            .pop()
            .expect("one result")
    }

    fn put_many(&mut self, items: &[(BlockKey, u32, &[u8])]) -> Vec<Result<(), StoreError>> {
        let mut results: Vec<Result<(), StoreError>> = Vec::with_capacity(items.len());
        let mut start = 0;
        while start < items.len() {
            // One pipeline: records until the byte budget (at least one).
            self.buf.clear();
            let mut end = start;
            let mut batch_ok = Vec::new();
            while end < items.len()
                && (end == start || self.buf.len() + items[end].2.len() <= self.cfg.max_batch_bytes)
            {
                let (key, lb, data) = items[end];
                end += 1;
                if lb == 0 || data.is_empty() || data.len() % lb as usize != 0 {
                    batch_ok.push(Some(StoreError::Io(format!(
                        "payload of {} bytes is not a whole, non-zero number of {lb}-byte layers",
                        data.len()
                    ))));
                    self.counters.io_errors += 1;
                    continue;
                }
                let header = RecordHeader::for_payload(&self.keys, key, lb, data);
                self.header_buf.clear();
                header.encode(&mut self.header_buf);
                let rkey = self.key(key);
                push_set(&mut self.buf, rkey.as_bytes(), &self.header_buf, data);
                batch_ok.push(None);
            }
            let sent = batch_ok.iter().filter(|e| e.is_none()).count();
            let mut replies = if sent > 0 {
                match self.exchange(sent) {
                    Ok(v) => Ok(v.into_iter()),
                    Err(e) => Err(e),
                }
            } else {
                Ok(Vec::new().into_iter())
            };
            for (i, pre) in batch_ok.into_iter().enumerate() {
                let item = &items[start + i];
                let r = match (pre, &mut replies) {
                    (Some(e), _) => Err(e),
                    (None, Err(e)) => Err(e.clone()),
                    (None, Ok(it)) => match it.next().expect("one reply per SET") {
                        Value::Okay | Value::SimpleString(_) => {
                            self.counters.puts += 1;
                            self.counters.bytes_written += item.2.len() as u64;
                            Ok(())
                        }
                        Value::ServerError(e) => Err(self.server_error(e.into())),
                        other => {
                            self.counters.io_errors += 1;
                            Err(StoreError::Io(format!(
                                "unexpected reply to SET: {other:?}"
                            )))
                        }
                    },
                };
                results.push(r);
            }
            start = end;
        }
        results
    }

    fn get_layers(
        &mut self,
        key: BlockKey,
        first_layer: u32,
        dst: &mut [u8],
    ) -> Result<(), StoreError> {
        let r = if self.cfg.range_reads {
            self.range_read(key, first_layer, dst)
        } else {
            self.whole_read(key, first_layer, dst)
        };
        self.count_read(&r, dst.len());
        r
    }

    fn contains_many(&mut self, keys: &[BlockKey]) -> Result<Vec<bool>, StoreError> {
        self.buf.clear();
        for &k in keys {
            let rkey = self.key(k);
            push_command(&mut self.buf, &[b"EXISTS", rkey.as_bytes()]);
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.exchange(keys.len())?
            .into_iter()
            .map(|v| match v {
                Value::Int(n) => Ok(n > 0),
                Value::ServerError(e) => Err(self.server_error(e.into())),
                other => {
                    self.counters.io_errors += 1;
                    Err(StoreError::Io(format!(
                        "unexpected reply to EXISTS: {other:?}"
                    )))
                }
            })
            .collect()
    }

    fn remove(&mut self, key: BlockKey) -> Result<(), StoreError> {
        let rkey = self.key(key);
        self.buf.clear();
        push_command(&mut self.buf, &[b"UNLINK", rkey.as_bytes()]);
        match self.exchange(1)?.pop().expect("1 reply") {
            Value::ServerError(e) => Err(self.server_error(e.into())),
            _ => Ok(()),
        }
    }

    fn counters(&self) -> StoreCounters {
        self.counters
    }

    fn keys(&self) -> &RecordKeys {
        &self.keys
    }
}

/// Layers whose header the first read of an unknown record's header covers.
const PROBE_LAYERS: u32 = 506;

/// Verifies `body` (the requested layers) and only then copies it into `dst`. Every caller
/// checked the range against the header (or the geometry it matches) before fetching or
/// slicing the body.
fn finish_read(
    keys: &RecordKeys,
    header: &RecordHeader,
    first_layer: u32,
    body: &[u8],
    dst: &mut [u8],
) -> Result<(), StoreError> {
    if body.len() != dst.len() {
        return Err(StoreError::Corrupt(format!(
            "value truncated: {} of {} bytes",
            body.len(),
            dst.len()
        )));
    }
    header.verify_layers(keys, first_layer, body)?;
    dst.copy_from_slice(body);
    Ok(())
}

/// Appends one RESP command (an array of bulk strings).
fn push_command(buf: &mut Vec<u8>, args: &[&[u8]]) {
    write!(buf, "*{}\r\n", args.len()).expect("vec write");
    for a in args {
        write!(buf, "${}\r\n", a.len()).expect("vec write");
        buf.extend_from_slice(a);
        buf.extend_from_slice(b"\r\n");
    }
}

/// `SET key (header ++ payload)`: the value is written in place, with no joined copy.
fn push_set(buf: &mut Vec<u8>, key: &[u8], header: &[u8], payload: &[u8]) {
    buf.reserve(key.len() + header.len() + payload.len() + 64);
    write!(buf, "*3\r\n$3\r\nSET\r\n${}\r\n", key.len()).expect("vec write");
    buf.extend_from_slice(key);
    write!(buf, "\r\n${}\r\n", header.len() + payload.len()).expect("vec write");
    buf.extend_from_slice(header);
    buf.extend_from_slice(payload);
    buf.extend_from_slice(b"\r\n");
}

/// `GETRANGE key start end` for `len` bytes from `start` (`end` is inclusive).
fn push_getrange(buf: &mut Vec<u8>, key: &str, start: usize, len: usize) {
    let (s, e) = (start.to_string(), (start + len.max(1) - 1).to_string());
    push_command(
        buf,
        &[b"GETRANGE", key.as_bytes(), s.as_bytes(), e.as_bytes()],
    );
}

/// A one-line description of a client error, with the authentication case named.
fn describe(e: &RedisError) -> String {
    if e.kind() == ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS") | Some("NOAUTH"))
    {
        format!("authentication failed: {e}")
    } else {
        e.to_string()
    }
}

/// The URL with any password replaced, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_encoding() {
        let mut b = Vec::new();
        push_command(&mut b, &[b"GET", b"k"]);
        assert_eq!(b, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n");
        b.clear();
        push_set(&mut b, b"k", b"hd", b"xyz");
        assert_eq!(b, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhdxyz\r\n");
        b.clear();
        push_getrange(&mut b, "k", 10, 5);
        assert_eq!(
            b,
            b"*4\r\n$8\r\nGETRANGE\r\n$1\r\nk\r\n$2\r\n10\r\n$2\r\n14\r\n"
        );
    }

    #[test]
    fn urls_are_checked_and_redacted() {
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
        let err = RemoteStore::open(RemoteConfig::new("nope://x", 1)).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { ref what, .. } if what == "url"),
            "{err}"
        );
        let mut cfg = RemoteConfig::new("redis://127.0.0.1:1", 1);
        cfg.io_timeout = Duration::ZERO;
        assert!(RemoteStore::open(cfg).is_err());
    }
}
