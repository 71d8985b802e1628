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
//! [`RemoteConfig::max_batch_bytes`]. The `redis` crate does the connection (TCP or TLS) and
//! the reply parsing.
//!
//! # Faults
//!
//! - Every call (each [`BlockStore`] method, and [`ping`](RemoteStore::ping)) has one deadline,
//!   [`RemoteConfig::timeout`], from its first round trip on (the encoding before it is not
//!   the server's time): connecting, the TLS handshake and every round trip it makes share it.
//!   The socket's timeouts follow what is left of it, and replies are read one by one,
//!   stopping at the first failure (the redis crate's pipeline read would wait the whole
//!   timeout once per reply). A server that is down, hung (`SIGSTOP`) or killed mid-call
//!   yields [`StoreError::Unavailable`] (a timed-out call also counts `timeouts`), never a
//!   panic or a long hang: a read is a miss, a write a failed write, and the scheduler's step
//!   goes on.
//! - After any transport failure, a timeout included, the connection is dropped, never reused:
//!   a late reply left in it would be read as the answer to the next command (another key's
//!   bytes). It is rebuilt on a later call. Attempts are spaced by
//!   [`RemoteConfig::reconnect_interval`], doubling per consecutive failure up to
//!   [`RemoteConfig::max_reconnect_interval`]; between attempts calls fail at once, so a dead
//!   or hung server does not slow every scheduler step. The streak of failures ends with the
//!   first reply received, not with a connect (a hung server still accepts connections). A
//!   failed call counts `unavailable` once (a failed `put_many` returns `Unavailable` for each
//!   of its records).
//! - A server out of memory (`OOM` reply, `maxmemory` with `noeviction`) is
//!   [`StoreError::Full`] for that record (`writes_skipped_full`).
//! - A wrong password or ACL user is `Unavailable` with "authentication failed" in its message;
//!   a server certificate the trusted CAs did not sign, "TLS".
//!
//! # Transport
//!
//! `redis://` is plain TCP; `rediss://` is TLS (rustls), verifying the server's certificate
//! and name against the private CA of [`RemoteConfig::tls_ca`], else the public roots bundled
//! with the client (Mozilla's list, from the `webpki-roots` crate, so that no system file is
//! parsed within a reconnect's deadline), with an optional client certificate
//! ([`RemoteConfig::tls_cert`], [`RemoteConfig::tls_key`]) for servers that require one. The
//! store speaks RESP2 and sends `AUTH` and `SELECT` itself on each new connection, under the
//! call's deadline (the redis crate's own set-up would wait the whole timeout once per
//! command on a hung server).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use redis::{ErrorKind, IntoConnectionInfo, RedisError, Value};

use super::keys::{RecordKeys, Secret};
use super::store::{
    BlockKey, BlockStore, RecordHeader, StoreCounters, StoreError, HEADER_FIXED_BYTES,
    LAYERS_OFFSET,
};
use crate::error::Error;

mod tls;
mod wire;

use tls::{install_tls_provider, tls_certificates, tls_settings_need_tls};
use wire::{push_command, push_getrange, push_set, round_trip, time_left};

/// Settings of a [`RemoteStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    /// `redis://[[user]:password@]host:port[/db]` (also `valkey://`), or `rediss://...` (also
    /// `valkeys://`) for TLS.
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
    /// Deadline of one call, connecting and the TLS handshake included (see the module docs).
    pub timeout: Duration,
    /// Deadline of a lookup ([`contains_many`](BlockStore::contains_many)), at most
    /// `timeout`: the manager asks it inside an admission (which blocks another instance
    /// wrote), so a hung server must cost the scheduler's step little; a lookup that runs out
    /// is a miss.
    pub lookup_timeout: Duration,
    /// Least time between two connection attempts after a failure; doubles with each
    /// consecutive failed attempt, up to [`max_reconnect_interval`](Self::max_reconnect_interval).
    pub reconnect_interval: Duration,
    /// Cap of the reconnect back-off (a hung server costs one `timeout` per attempt).
    pub max_reconnect_interval: Duration,
    /// Most bytes of commands in one pipeline (bounds the client's buffer).
    pub max_batch_bytes: usize,
    /// Read layer ranges with `GETRANGE` (header and range in one pipeline) rather than `GET`
    /// of the whole value. Only the layers asked for cross the wire.
    pub range_reads: bool,
    /// TLS only: a PEM file of the CA certificates to trust instead of the bundled public
    /// roots (a private CA).
    pub tls_ca: Option<PathBuf>,
    /// TLS only: a PEM file of the client's certificate chain, for servers that require one
    /// (mutual TLS). Needs [`tls_key`](Self::tls_key).
    pub tls_cert: Option<PathBuf>,
    /// TLS only: the PEM file of [`tls_cert`](Self::tls_cert)'s private key.
    pub tls_key: Option<PathBuf>,
}

impl RemoteConfig {
    /// Defaults: derived prefix, no secret, a 50 ms deadline per call, reconnect attempts 100 ms
    /// apart doubling up to 2 s, 64 MiB pipelines, range reads, the bundled public TLS roots.
    pub fn new(url: impl Into<String>, namespace: u64) -> Self {
        RemoteConfig {
            url: url.into(),
            username: None,
            password: None,
            key_prefix: None,
            namespace,
            secret: None,
            timeout: Duration::from_millis(50),
            lookup_timeout: Duration::from_millis(10),
            reconnect_interval: Duration::from_millis(100),
            max_reconnect_interval: Duration::from_secs(2),
            max_batch_bytes: 64 << 20,
            range_reads: true,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
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
    /// Sent on each new connection before anything else.
    hello: Hello,
    /// The current call's deadline: set by its first round trip (or connection attempt), so
    /// that it bounds the waiting on the server, not the encoding before it.
    deadline: Option<Instant>,
    /// How long the current call may take (`timeout`, or `lookup_timeout` for a lookup).
    call_timeout: Duration,
    /// No connection attempt before this instant (set after a failure).
    retry_at: Option<Instant>,
    /// Why the last connection failed, for the next `Unavailable` message.
    last_failure: String,
    /// Consecutive failures since the last reply (sets the back-off).
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

/// `AUTH` and `SELECT`, as the URL and settings ask, in one pipeline.
#[derive(Default)] // no Debug: it holds the password
struct Hello {
    commands: Vec<u8>,
    auth: bool,
    select: bool,
}

impl Hello {
    fn new(info: &redis::RedisConnectionInfo) -> Hello {
        let mut hello = Hello::default();
        if let Some(password) = &info.password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(user) = &info.username {
                args.push(user.as_bytes());
            }
            args.push(password.as_bytes());
            push_command(&mut hello.commands, &args);
            hello.auth = true;
        }
        if info.db != 0 {
            push_command(
                &mut hello.commands,
                &[b"SELECT", info.db.to_string().as_bytes()],
            );
            hello.select = true;
        }
        hello
    }

    fn len(&self) -> usize {
        usize::from(self.auth) + usize::from(self.select)
    }

    /// The first refusal among the replies, described.
    fn refusal(&self, replies: &[Value]) -> Option<String> {
        let what = [
            (self.auth, "authentication failed"),
            (self.select, "SELECT refused"),
        ];
        let sent = what.iter().filter(|w| w.0).map(|w| w.1);
        sent.zip(replies).find_map(|(what, reply)| match reply {
            Value::ServerError(e) => Some(format!("{what}: {}", RedisError::from(e.clone()))),
            _ => None,
        })
    }
}

/// Why a connection attempt or a round trip failed.
#[derive(Debug)]
struct Failure {
    why: String,
    /// The deadline passed.
    timed_out: bool,
    /// Nothing was sent or attempted: the connection (if any) holds no reply and stays usable.
    clean: bool,
}

impl Failure {
    fn new(why: String) -> Failure {
        Failure {
            why,
            timed_out: false,
            clean: false,
        }
    }

    /// The deadline passed before anything was sent or attempted.
    fn late() -> Failure {
        Failure {
            why: "deadline passed before the command was sent".into(),
            timed_out: true,
            clean: true,
        }
    }
}

impl From<RedisError> for Failure {
    fn from(e: RedisError) -> Failure {
        Failure {
            why: describe(&e),
            timed_out: e.is_timeout(),
            clean: false,
        }
    }
}

impl RemoteStore {
    /// Validates `cfg` and tries to connect once. A server that cannot be reached (or refuses
    /// the credentials) is not an error here: calls return `Unavailable` until it can be.
    /// Errors (`InvalidArgument`): a malformed URL, a zero timeout, TLS settings without a
    /// `rediss://` URL, or TLS files that cannot be read or hold no PEM certificate or key.
    pub fn open(cfg: RemoteConfig) -> Result<RemoteStore, Error> {
        let mut store = Self::new(cfg)?;
        store.start_call();
        if let Err(f) = store.connect_now() {
            store.schedule_retry(f.why);
        }
        Ok(store)
    }

    /// Validates `cfg` as [`open`](Self::open) does, then makes a `PING` (its own connection
    /// attempt): fails with the reason when the server cannot be reached or refuses the
    /// credentials (or, over TLS, its certificate is not trusted).
    pub fn connect(cfg: RemoteConfig) -> Result<RemoteStore, Error> {
        let mut store = Self::new(cfg)?;
        store.ping().map_err(|e| Error::InvalidArgument {
            what: "url".into(),
            message: format!("{}: {e}", redact(&store.cfg.url)),
        })?;
        Ok(store)
    }

    /// A store on `cfg`, validated, not connected.
    fn new(cfg: RemoteConfig) -> Result<RemoteStore, Error> {
        let mut info = cfg
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| bad("url", format!("{:?}: {e}", redact(&cfg.url))))?;
        let tls = match info.addr {
            redis::ConnectionAddr::Tcp(..) => false,
            redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
                return Err(bad(
                    "url",
                    "#insecure (TLS without certificate checks) is not supported; give the \
                     server's CA as tls_ca instead"
                        .into(),
                ))
            }
            redis::ConnectionAddr::TcpTls { .. } => true,
            _ => {
                return Err(bad(
                    "url",
                    "only redis:// (TCP) and rediss:// (TLS) addresses are supported".into(),
                ))
            }
        };
        if cfg.username.is_some() {
            info.redis.username = cfg.username.clone();
        }
        if cfg.password.is_some() {
            info.redis.password = cfg.password.clone();
        }
        // The store authenticates and selects the database itself, under its deadline.
        let hello = Hello::new(&info.redis);
        info.redis = redis::RedisConnectionInfo::default();
        if cfg.timeout.is_zero() {
            return Err(bad("timeout", "must be positive".into()));
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
        let client = if tls {
            install_tls_provider();
            redis::Client::build_with_tls(info, tls_certificates(&cfg)?)
        } else {
            tls_settings_need_tls(&cfg)?;
            redis::Client::open(info)
        }
        .map_err(|e| bad("url", e.to_string()))?;
        Ok(RemoteStore {
            deadline: None,
            call_timeout: cfg.timeout,
            cfg,
            keys,
            prefix,
            client,
            conn: None,
            hello,
            retry_at: None,
            last_failure: String::new(),
            failures: 0,
            counters: StoreCounters::default(),
            geometry: HashMap::new(),
            buf: Vec::new(),
            header_buf: Vec::new(),
        })
    }

    /// Round trip to the server (connecting if needed).
    pub fn ping(&mut self) -> Result<(), StoreError> {
        self.start_call();
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

    /// Starts a public call (its deadline starts with its first round trip).
    fn start_call(&mut self) {
        self.deadline = None;
        self.call_timeout = self.cfg.timeout;
    }

    /// Starts a lookup: a call under the shorter lookup deadline.
    fn start_lookup(&mut self) {
        self.deadline = None;
        self.call_timeout = self.cfg.lookup_timeout.min(self.cfg.timeout);
    }

    /// The current call's deadline, starting it now if it has not started.
    fn deadline(&mut self) -> Instant {
        let t = self.call_timeout;
        *self.deadline.get_or_insert_with(|| Instant::now() + t)
    }

    /// Opens and authenticates a connection if there is none, within the call's deadline.
    /// Does not look at the back-off (see `exchange`).
    fn connect_now(&mut self) -> Result<(), Failure> {
        if self.conn.is_some() {
            return Ok(());
        }
        let deadline = self.deadline();
        let left = time_left(deadline).ok_or_else(Failure::late)?;
        let mut conn = self.client.get_connection_with_timeout(left)?;
        if self.hello.len() > 0 {
            let replies = round_trip(&mut conn, &self.hello.commands, self.hello.len(), deadline)?;
            if let Some(why) = self.hello.refusal(&replies) {
                return Err(Failure::new(why));
            }
        }
        self.conn = Some(conn);
        Ok(())
    }

    /// Sends the `n` commands in `self.buf` and returns their replies (server errors as
    /// `Value::ServerError`), connecting first if the back-off allows. A transport failure or
    /// the deadline drops the connection: `Unavailable`.
    fn exchange(&mut self, n: usize) -> Result<Vec<Value>, StoreError> {
        if self.conn.is_none() {
            if let Some(at) = self.retry_at.filter(|&at| Instant::now() < at) {
                self.counters.unavailable += 1;
                return Err(StoreError::Unavailable(format!(
                    "not connected ({}); next attempt in {} ms",
                    self.last_failure,
                    (at - Instant::now()).as_millis()
                )));
            }
            if let Err(f) = self.connect_now() {
                return Err(self.transport_failure(f));
            }
        }
        let deadline = self.deadline();
        let conn = self.conn.as_mut().expect("connected above");
        match round_trip(conn, &self.buf, n, deadline) {
            Ok(values) => {
                self.failures = 0;
                self.retry_at = None;
                Ok(values)
            }
            Err(f) => Err(self.transport_failure(f)),
        }
    }

    /// Counts a failed call. Unless nothing was sent (or attempted), drops the connection (its
    /// stream state is unknown: a late reply must not answer the next command) and schedules
    /// the next attempt.
    fn transport_failure(&mut self, f: Failure) -> StoreError {
        self.counters.unavailable += 1;
        if f.timed_out {
            self.counters.timeouts += 1;
        }
        if !f.clean {
            self.conn = None;
            self.schedule_retry(f.why.clone());
        }
        StoreError::Unavailable(if f.timed_out {
            format!(
                "timed out after {} ms: {}",
                self.cfg.timeout.as_millis(),
                f.why
            )
        } else {
            f.why
        })
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
            let fits = dst.len().is_multiple_of(lb as usize)
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

    fn reader(&self) -> Option<Box<dyn BlockStore>> {
        // Its own connection (made on the first read), the same settings and deadline.
        Some(Box::new(RemoteStore::new(self.cfg.clone()).ok()?))
    }

    fn put(&mut self, key: BlockKey, layer_bytes: u32, data: &[u8]) -> Result<(), StoreError> {
        self.put_many(&[(key, layer_bytes, data)])
            .pop()
            .expect("one result")
    }

    fn put_many(&mut self, items: &[(BlockKey, u32, &[u8])]) -> Vec<Result<(), StoreError>> {
        self.start_call(); // one deadline for all the pipelines
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
        self.start_call();
        let r = if self.cfg.range_reads {
            self.range_read(key, first_layer, dst)
        } else {
            self.whole_read(key, first_layer, dst)
        };
        self.count_read(&r, dst.len());
        r
    }

    fn contains_many(&mut self, keys: &[BlockKey]) -> Result<Vec<bool>, StoreError> {
        self.start_lookup();
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
        self.start_call();
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

fn bad(what: &str, message: String) -> Error {
    Error::InvalidArgument {
        what: what.into(),
        message,
    }
}

/// A one-line description of a client error, with the authentication and TLS cases named.
fn describe(e: &RedisError) -> String {
    let tls = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    if let Some(tls) = tls {
        format!("TLS: {tls}")
    } else if e.kind() == ErrorKind::AuthenticationFailed
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
        cfg.timeout = Duration::ZERO;
        assert!(RemoteStore::open(cfg).is_err());
    }
}
