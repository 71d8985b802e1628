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
//! # Cluster
//!
//! A `redis+cluster://[[user]:password@]host:port[,host:port...]` URL (also `valkey+cluster://`,
//! and `rediss+cluster://` / `valkeys+cluster://` for TLS, each node with the same TLS
//! settings) puts the store on a Valkey/Redis Cluster. The seeds are tried in order for the
//! slot map (`CLUSTER SLOTS`, at open or at the first call that finds none); the nodes it names
//! are reached as they are needed, each with its own connection, deadline and back-off as
//! above. Only primaries are read from and written to. A single-server URL never routes.
//!
//! Keys carry a hash tag in a cluster, `<prefix>:<namespace>:{<id>}:<group>`, so the groups of
//! one block (read together on a hit) share a slot, and blocks spread evenly over the
//! primaries by their keyed ids. Why per block and not per prefix: a store key names a block
//! only by its record id (a one-way function of its chain, see [`RecordKeys`]), which holds no
//! trace of the prefix it extends, so the tiers would have to carry an anchor id (the id of
//! the first block of the block's prefix chunk) in every key they pass down to place a prefix's
//! blocks together. Per block, a tenant's hot prefix is spread over the nodes, and a lookup or
//! a batched write asks every node involved at once (one pipeline per node, the nodes in
//! parallel threads). The cost: a dead primary leaves holes in most long prefixes, and a
//! prefix hit ends at its first hole (prefix chunks, each on one node, would lose whole
//! chunks instead; see the crate's issues).
//!
//! Every batched call groups its commands per node (one pipeline each, under the call's one
//! deadline), so a hung or dead node fails only its own records: a read of them is
//! `Unavailable` (a miss), a write a failed write, a lookup reports them absent (a lookup
//! fails only when no node answered). A `MOVED` reply (the slot has a new owner) updates the
//! slot map and the command is sent on; an `ASK` reply (the slot is being migrated) sends it on
//! once with `ASKING` first; at most three hops, within the deadline. A node that fails makes
//! the slot map due for a reload (from a connected node, a reconnect interval later): a
//! replica promoted in a dead primary's place, at its own address, is learned that way, since
//! the dead node sends no `MOVED`. `CLUSTERDOWN`,
//! `TRYAGAIN` and the like are `Unavailable`. Routing is done here rather than by the redis
//! crate's `cluster` feature for the fault model above (see `remote/cluster.rs`).
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
//!   failed call counts `unavailable` once, in a cluster once per node that failed (a failed
//!   `put_many` returns `Unavailable` for each of its records).
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

mod cluster;
mod node;
mod tls;
mod wire;

use cluster::{Redirect, SLOTS};
use node::{Backoff, Node};
use tls::{install_tls_provider, tls_certificates, tls_settings_need_tls};
use wire::{push_command, push_getrange, push_set};

/// Settings of a [`RemoteStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteConfig {
    /// `redis://[[user]:password@]host:port[/db]` (also `valkey://`), or `rediss://...` (also
    /// `valkeys://`) for TLS. A cluster: `redis+cluster://[[user]:password@]host:port[,host:port
    /// ...]` (also `valkey+cluster://`; `rediss+cluster://` or `valkeys+cluster://` for TLS),
    /// listing seed nodes, one of which must answer (see the module docs).
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
    /// The server; in a cluster, the seeds first, then the nodes learned since.
    nodes: Vec<Node>,
    /// A cluster's routing (None: one server, `nodes[0]`).
    cluster: Option<Cluster>,
    /// Sent on each new connection before anything else.
    hello: Hello,
    /// The current call's deadline: set by its first round trip (or connection attempt), so
    /// that it bounds the waiting on the server, not the encoding before it.
    deadline: Option<Instant>,
    /// How long the current call may take (`timeout`, or `lookup_timeout` for a lookup).
    call_timeout: Duration,
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
            .field(
                "nodes",
                &self.nodes.iter().map(|n| &n.addr).collect::<Vec<_>>(),
            )
            .field("connected", &self.is_connected())
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

/// A cluster's routing state.
struct Cluster {
    /// The node (index in `nodes`) serving each slot; `NO_NODE` until the map is loaded.
    slots: Vec<u16>,
    /// Whether a `CLUSTER SLOTS` map has been loaded.
    loaded: bool,
    /// Reload the map from this instant on (set when a node fails: its slots may have a new
    /// owner, a replica promoted at another address, which only a live node can tell).
    reload_at: Option<Instant>,
    /// How to reach a node learned from the cluster (its scheme and TLS settings).
    tls: Option<redis::TlsCertificates>,
}

impl Cluster {
    fn needs_load(&self) -> bool {
        !self.loaded || self.reload_at.is_some_and(|at| Instant::now() >= at)
    }
}

const NO_NODE: u16 = u16::MAX;

/// One command's reply, or why it could not be had (a redirection that failed).
type Reply = Result<Value, StoreError>;

/// Most redirections one command follows (a slot moving twice while in flight is rare; a loop
/// is a misconfigured cluster).
const MAX_HOPS: usize = 3;

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
        let deadline = store.deadline();
        let backoff = store.backoff();
        if store.cluster.is_some() {
            let _ = store.load_slots(deadline); // else: loaded by a later call
        } else {
            store.nodes[0].try_connect(&store.hello, deadline, backoff);
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
        let seeds = match cluster::seed_urls(&cfg.url) {
            None => None,
            Some(Ok(seeds)) => Some(seeds),
            Some(Err(why)) => return Err(bad("url", format!("{:?}: {why}", redact(&cfg.url)))),
        };
        let urls = seeds.clone().unwrap_or_else(|| vec![cfg.url.clone()]);
        let mut infos = Vec::with_capacity(urls.len());
        for url in &urls {
            infos.push(parse_url(url)?);
        }
        let tls = matches!(infos[0].addr, redis::ConnectionAddr::TcpTls { .. });
        let mut first = infos[0].redis.clone();
        if cfg.username.is_some() {
            first.username = cfg.username.clone();
        }
        if cfg.password.is_some() {
            first.password = cfg.password.clone();
        }
        // The store authenticates and selects the database itself, under its deadline.
        let hello = Hello::new(&first);
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
        let certs = if tls {
            install_tls_provider();
            Some(tls_certificates(&cfg)?)
        } else {
            tls_settings_need_tls(&cfg)?;
            None
        };
        let mut nodes = Vec::with_capacity(infos.len());
        for info in infos {
            let addr = info.addr.to_string();
            nodes.push(Node::new(addr, client_for(info, certs.as_ref())?));
        }
        let cluster = seeds.map(|_| Cluster {
            slots: vec![NO_NODE; SLOTS],
            loaded: false,
            reload_at: None,
            tls: certs,
        });
        Ok(RemoteStore {
            deadline: None,
            call_timeout: cfg.timeout,
            cfg,
            keys,
            prefix,
            nodes,
            cluster,
            hello,
            counters: StoreCounters::default(),
            geometry: HashMap::new(),
            buf: Vec::new(),
            header_buf: Vec::new(),
        })
    }

    /// Round trip to the server (connecting if needed).
    /// In a cluster, every node that serves slots is pinged (in parallel), and the first
    /// failure is the answer.
    pub fn ping(&mut self) -> Result<(), StoreError> {
        self.start_call();
        let targets: Vec<usize> = match &self.cluster {
            None => vec![0],
            Some(_) => {
                let deadline = self.deadline();
                self.load_slots(deadline)?;
                self.serving_nodes()
            }
        };
        let mut ping = Vec::new();
        push_command(&mut ping, &[b"PING"]);
        let jobs = targets.into_iter().map(|n| (n, ping.clone(), 1)).collect();
        for (_, r) in self.run(jobs) {
            if let Value::ServerError(e) = r?.pop().expect("1 reply")? {
                return Err(self.server_error(e.into()));
            }
        }
        Ok(())
    }

    /// Whether a connection is currently open (in a cluster: to any node).
    pub fn is_connected(&self) -> bool {
        self.nodes.iter().any(Node::is_connected)
    }

    /// Whether the store routes over a cluster (a `redis+cluster://` URL).
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
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
    /// In a cluster the record id is the key's hash tag, so that all groups of a block share
    /// a slot (see the module docs).
    pub fn key(&self, key: BlockKey) -> String {
        let (open, close) = if self.cluster.is_some() {
            ("{", "}")
        } else {
            ("", "")
        };
        format!(
            "{}:{:016x}:{open}{:016x}{close}:{}",
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

    fn backoff(&self) -> Backoff {
        Backoff {
            first: self.cfg.reconnect_interval,
            max: self.cfg.max_reconnect_interval,
        }
    }

    /// The node serving `rkey`: the server, or in a cluster its slot's owner (loading the
    /// slot map first if need be).
    fn node_of(&mut self, rkey: &[u8]) -> Result<usize, StoreError> {
        let Some(c) = &self.cluster else {
            return Ok(0);
        };
        let slot = usize::from(cluster::slot_of(rkey));
        if c.needs_load() {
            let deadline = self.deadline();
            self.load_slots(deadline)?;
        }
        match self.cluster.as_ref().map(|c| c.slots[slot]) {
            Some(NO_NODE) | None => {
                self.counters.unavailable += 1;
                Err(StoreError::Unavailable(format!(
                    "cluster slot {slot} has no node"
                )))
            }
            Some(n) => Ok(usize::from(n)),
        }
    }

    /// The nodes that serve at least one slot.
    fn serving_nodes(&self) -> Vec<usize> {
        let mut seen = vec![false; self.nodes.len()];
        if let Some(c) = &self.cluster {
            for &n in c.slots.iter().filter(|&&n| n != NO_NODE) {
                seen[usize::from(n)] = true;
            }
        }
        (0..seen.len()).filter(|&i| seen[i]).collect()
    }

    /// Loads the slot map with `CLUSTER SLOTS` unless it is loaded and no reload is due: from
    /// the first node that answers, connected nodes first (a node that just failed is tried
    /// last, not waited for first), then the seeds and the others in order. Each node's
    /// back-off applies. All failing is `Unavailable` when there is no map yet; a map already
    /// loaded stays in use and the reload is tried again a reconnect interval later.
    fn load_slots(&mut self, deadline: Instant) -> Result<(), StoreError> {
        if !self.cluster.as_ref().is_some_and(Cluster::needs_load) {
            return Ok(());
        }
        let mut cmd = Vec::new();
        push_command(&mut cmd, &[b"CLUSTER", b"SLOTS"]);
        let mut why = String::new();
        let mut order: Vec<usize> = (0..self.nodes.len()).collect();
        order.sort_by_key(|&i| !self.nodes[i].is_connected());
        for i in order {
            let backoff = self.backoff();
            let reply = self.nodes[i].exchange(&self.hello, &cmd, 1, deadline, backoff);
            let host = host_of(&self.nodes[i].addr).to_string();
            match reply.map(|mut v| v.pop().expect("1 reply")) {
                Ok(Value::ServerError(e)) => {
                    why = format!("{}: {}", self.nodes[i].addr, describe(&e.into()))
                }
                Ok(v) => match cluster::parse_slots(v, &host) {
                    Ok(ranges) => return self.install_slots(&ranges),
                    Err(e) => why = format!("{}: {e}", self.nodes[i].addr),
                },
                Err(f) => {
                    why = format!("{}: {}", self.nodes[i].addr, f.why);
                    if f.timed_out {
                        self.counters.timeouts += 1;
                    }
                }
            }
        }
        let retry = Instant::now() + self.cfg.reconnect_interval;
        let c = self.cluster.as_mut().expect("a cluster");
        if c.loaded {
            c.reload_at = Some(retry);
            return Ok(());
        }
        self.counters.unavailable += 1;
        Err(StoreError::Unavailable(format!(
            "no cluster node gave its slot map ({why})"
        )))
    }

    fn install_slots(&mut self, ranges: &[cluster::SlotRange]) -> Result<(), StoreError> {
        self.cluster
            .as_mut()
            .expect("a cluster")
            .slots
            .fill(NO_NODE);
        for r in ranges {
            let n = self.node_index(&r.addr).map_err(StoreError::Unavailable)?;
            let c = self.cluster.as_mut().expect("a cluster");
            c.slots[usize::from(r.first)..=usize::from(r.last)].fill(n);
        }
        let c = self.cluster.as_mut().expect("a cluster");
        c.loaded = true;
        c.reload_at = None;
        Ok(())
    }

    /// The index of the node at `addr` (`host:port`), added if new.
    fn node_index(&mut self, addr: &str) -> Result<u16, String> {
        if let Some(i) = self.nodes.iter().position(|n| n.addr == addr) {
            return Ok(i as u16);
        }
        if self.nodes.len() >= usize::from(NO_NODE) {
            return Err(format!("too many cluster nodes to add {addr}"));
        }
        let c = self
            .cluster
            .as_ref()
            .expect("nodes are learned in a cluster only");
        let scheme = if c.tls.is_some() { "rediss" } else { "redis" };
        let info = parse_url(&format!("{scheme}://{addr}")).map_err(|e| e.to_string())?;
        let client = client_for(info, c.tls.as_ref()).map_err(|e| e.to_string())?;
        self.nodes.push(Node::new(addr.to_string(), client));
        Ok((self.nodes.len() - 1) as u16)
    }

    /// Sends the `n` commands in `self.buf`, all on the key `rkey`, to its node and returns
    /// their replies, following redirections. A transport failure is `Unavailable`.
    fn exchange(&mut self, rkey: &str, n: usize) -> Result<Vec<Value>, StoreError> {
        let node = self.node_of(rkey.as_bytes())?;
        let buf = std::mem::take(&mut self.buf);
        let (buf, replies) = self.run(vec![(node, buf, n)]).pop().expect("one job");
        self.buf = buf;
        replies?.into_iter().collect()
    }

    /// Runs pipelines, one per job `(node, commands, count)` (at most one job per node), on
    /// their nodes in parallel under the call's deadline, then follows the redirections in
    /// their replies. Returns each job's buffer and replies (a failed job is `Unavailable`,
    /// counted once; so is a redirected command that could not be sent on), in order.
    #[allow(clippy::type_complexity)]
    fn run(
        &mut self,
        jobs: Vec<(usize, Vec<u8>, usize)>,
    ) -> Vec<(Vec<u8>, Result<Vec<Reply>, StoreError>)> {
        let deadline = self.deadline();
        let backoff = self.backoff();
        let hello = &self.hello;
        let mut results: Vec<Option<Result<Vec<Value>, Failure>>> = Vec::new();
        results.resize_with(jobs.len(), || None);
        if let [(node, buf, n)] = &jobs[..] {
            results[0] = Some(self.nodes[*node].exchange(hello, buf, *n, deadline, backoff));
        } else {
            // One thread per node: a hung node holds its own thread to the deadline, not the
            // others' replies.
            let mut by_node: Vec<Option<&mut Node>> = self.nodes.iter_mut().map(Some).collect();
            std::thread::scope(|s| {
                for ((node, buf, n), out) in jobs.iter().zip(results.iter_mut()) {
                    let node = by_node[*node].take().expect("one job per node");
                    s.spawn(move || *out = Some(node.exchange(hello, buf, *n, deadline, backoff)));
                }
            });
        }
        let mut out = Vec::with_capacity(jobs.len());
        for ((_, buf, _), r) in jobs.into_iter().zip(results) {
            let r = match r.expect("every job ran") {
                Ok(replies) => Ok(self.follow_redirects(&buf, replies, deadline)),
                Err(f) => Err(self.transport_failure(f)),
            };
            out.push((buf, r));
        }
        out
    }

    /// Replaces each `MOVED`/`ASK` reply in `replies` (to the commands of `buf`) by the reply
    /// of the node it names: `MOVED` also updates the slot map; `ASK` sends `ASKING` first. A
    /// node that cannot be reached, or too many hops, is `Unavailable` for that command.
    fn follow_redirects(
        &mut self,
        buf: &[u8],
        replies: Vec<Value>,
        deadline: Instant,
    ) -> Vec<Reply> {
        if !replies.iter().any(|r| Redirect::of(r).is_some()) {
            return replies.into_iter().map(Ok).collect();
        }
        let commands = cluster::split_commands(buf);
        replies
            .into_iter()
            .zip(commands)
            .map(|(reply, range)| self.follow(&buf[range], reply, deadline))
            .collect()
    }

    /// Follows `reply`'s redirections of the command `cmd`, if any.
    fn follow(&mut self, cmd: &[u8], mut reply: Value, deadline: Instant) -> Reply {
        let mut hops = 0;
        while let Some(to) = Redirect::of(&reply) {
            if hops == MAX_HOPS || self.cluster.is_none() {
                self.counters.unavailable += 1;
                return Err(StoreError::Unavailable(format!(
                    "{} redirections, the last to {}",
                    hops + 1,
                    to.addr
                )));
            }
            hops += 1;
            let node = self.node_index(&to.addr).map_err(|why| {
                self.counters.unavailable += 1;
                StoreError::Unavailable(why)
            })?;
            let mut send = Vec::with_capacity(cmd.len() + 16);
            if to.ask {
                push_command(&mut send, &[b"ASKING"]);
            } else if let Some(c) = self.cluster.as_mut() {
                c.slots[usize::from(to.slot)] = node;
            }
            send.extend_from_slice(cmd);
            let n = 1 + usize::from(to.ask);
            let backoff = self.backoff();
            let r =
                self.nodes[usize::from(node)].exchange(&self.hello, &send, n, deadline, backoff);
            reply = match r {
                Ok(mut v) => v.pop().expect("replies"),
                Err(f) => return Err(self.transport_failure(f)),
            };
        }
        Ok(reply)
    }

    /// Counts a failed round trip (the node has dropped its connection if anything was sent).
    /// In a cluster, a node that failed makes the slot map due for a reload.
    fn transport_failure(&mut self, f: Failure) -> StoreError {
        if let Some(c) = self.cluster.as_mut().filter(|_| !f.clean) {
            c.reload_at
                .get_or_insert(Instant::now() + self.cfg.reconnect_interval);
        }
        self.counters.unavailable += 1;
        if f.timed_out {
            self.counters.timeouts += 1;
        }
        StoreError::Unavailable(if f.timed_out {
            format!(
                "timed out after {} ms: {}",
                self.call_timeout.as_millis(),
                f.why
            )
        } else {
            f.why
        })
    }

    /// In a cluster, loads the slot map unless it is loaded and no reload is due (within the
    /// call's deadline).
    fn route_ready(&mut self) -> Result<(), StoreError> {
        if !self.cluster.as_ref().is_some_and(Cluster::needs_load) {
            return Ok(());
        }
        let deadline = self.deadline();
        self.load_slots(deadline)
    }

    /// The result of one `SET` of `bytes` payload bytes, counted.
    fn set_reply(&mut self, v: Value, bytes: usize) -> Result<(), StoreError> {
        match v {
            Value::Okay | Value::SimpleString(_) => {
                self.counters.puts += 1;
                self.counters.bytes_written += bytes as u64;
                Ok(())
            }
            Value::ServerError(e) => Err(self.server_error(e.into())),
            other => {
                self.counters.io_errors += 1;
                Err(StoreError::Io(format!(
                    "unexpected reply to SET: {other:?}"
                )))
            }
        }
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
            // A cluster without a quorum or a slot's owner, a failover or a migration under
            // way, a redirection loop: that node's records are unreachable for now.
            Some("CLUSTERDOWN") | Some("TRYAGAIN") | Some("MASTERDOWN") | Some("LOADING")
            | Some("MOVED") | Some("ASK") => {
                self.counters.unavailable += 1;
                StoreError::Unavailable(describe(&e))
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
                let mut replies = self.exchange(&rkey, 2)?.into_iter();
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
        let head = self.single_bulk(&rkey)?;
        let mut header = self.decode_header(&head, key);
        if let Err(StoreError::Corrupt(_)) = header {
            // Over PROBE_LAYERS layers: fetch the exact header length.
            if head.len() >= HEADER_FIXED_BYTES {
                let at = LAYERS_OFFSET;
                let layers =
                    u32::from_le_bytes(head[at..at + 4].try_into().expect("4")).min(1 << 16);
                self.buf.clear();
                push_getrange(&mut self.buf, &rkey, 0, header_len(layers));
                let head = self.single_bulk(&rkey)?;
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
        let body = self.single_bulk(&rkey)?;
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
        let value = self.single_bulk(&rkey)?;
        let header = self.decode_header(&value, key)?;
        header.check_range(first_layer, dst.len())?;
        let start = header.encoded_len() + first_layer as usize * header.layer_bytes as usize;
        let body = value.get(start..start + dst.len()).unwrap_or(&[]);
        finish_read(&self.keys, &header, first_layer, body, dst)
    }

    fn single_bulk(&mut self, rkey: &str) -> Result<Vec<u8>, StoreError> {
        let reply = self.exchange(rkey, 1)?.pop().expect("1 reply");
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
        let mut results: Vec<Option<Result<(), StoreError>>> = vec![None; items.len()];
        if let Err(e) = self.route_ready() {
            return vec![Err(e); items.len()];
        }
        let mut start = 0;
        while start < items.len() {
            // One round: records until the byte budget (at least one), one pipeline per node.
            let mut round = Round::new(std::mem::take(&mut self.buf));
            let mut end = start;
            while end < items.len()
                && (end == start || round.bytes + items[end].2.len() <= self.cfg.max_batch_bytes)
            {
                let (key, lb, data) = items[end];
                end += 1;
                if lb == 0 || data.is_empty() || data.len() % lb as usize != 0 {
                    results[end - 1] = Some(Err(StoreError::Io(format!(
                        "payload of {} bytes is not a whole, non-zero number of {lb}-byte layers",
                        data.len()
                    ))));
                    self.counters.io_errors += 1;
                    continue;
                }
                let rkey = self.key(key);
                let node = match self.node_of(rkey.as_bytes()) {
                    Ok(n) => n,
                    Err(e) => {
                        results[end - 1] = Some(Err(e));
                        continue;
                    }
                };
                let header = RecordHeader::for_payload(&self.keys, key, lb, data);
                self.header_buf.clear();
                header.encode(&mut self.header_buf);
                round.push(node, end - 1, |buf| {
                    push_set(buf, rkey.as_bytes(), &self.header_buf, data)
                });
            }
            let members = std::mem::take(&mut round.members);
            let done = self.run(round.jobs);
            for (j, ((buf, replies), members)) in done.into_iter().zip(members).enumerate() {
                if j == 0 {
                    self.buf = buf; // reused by the next round and call
                }
                match replies {
                    Err(e) => members
                        .iter()
                        .for_each(|&i| results[i] = Some(Err(e.clone()))),
                    Ok(replies) => {
                        for (i, v) in members.into_iter().zip(replies) {
                            let r = v.and_then(|v| self.set_reply(v, items[i].2.len()));
                            results[i] = Some(r);
                        }
                    }
                }
            }
            start = end;
        }
        results
            .into_iter()
            .map(|r| r.expect("every item has a result"))
            .collect()
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

    /// In a cluster, the keys of a node that cannot be reached are reported absent (misses,
    /// counted `unavailable`); the call fails only when no node answered.
    fn contains_many(&mut self, keys: &[BlockKey]) -> Result<Vec<bool>, StoreError> {
        self.start_lookup();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.route_ready()?;
        let mut round = Round::new(std::mem::take(&mut self.buf));
        let mut found = vec![false; keys.len()];
        let mut last_failure = None;
        for (i, &k) in keys.iter().enumerate() {
            let rkey = self.key(k);
            match self.node_of(rkey.as_bytes()) {
                Ok(node) => round.push(node, i, |buf| {
                    push_command(buf, &[b"EXISTS", rkey.as_bytes()])
                }),
                Err(e) => last_failure = Some(e),
            }
        }
        let members = std::mem::take(&mut round.members);
        let mut answered = false;
        for (j, ((buf, replies), members)) in
            self.run(round.jobs).into_iter().zip(members).enumerate()
        {
            if j == 0 {
                self.buf = buf;
            }
            let replies = match replies {
                Ok(r) => r,
                Err(e) => {
                    last_failure = Some(e);
                    continue;
                }
            };
            answered = true;
            for (i, v) in members.into_iter().zip(replies) {
                found[i] = match v {
                    Err(_) => false, // counted where it failed
                    Ok(Value::Int(n)) => n > 0,
                    Ok(Value::ServerError(e)) => {
                        let e = self.server_error(e.into());
                        if self.cluster.is_none() {
                            return Err(e);
                        }
                        false
                    }
                    Ok(other) => {
                        self.counters.io_errors += 1;
                        return Err(StoreError::Io(format!(
                            "unexpected reply to EXISTS: {other:?}"
                        )));
                    }
                };
            }
        }
        match last_failure {
            Some(e) if !answered => Err(e),
            _ => Ok(found),
        }
    }

    fn remove(&mut self, key: BlockKey) -> Result<(), StoreError> {
        self.start_call();
        let rkey = self.key(key);
        self.buf.clear();
        push_command(&mut self.buf, &[b"UNLINK", rkey.as_bytes()]);
        match self.exchange(&rkey, 1)?.pop().expect("1 reply") {
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

/// The pipelines of one round of a batched call: one job per node, and which of the call's
/// items each job's commands are, in order.
struct Round {
    jobs: Vec<(usize, Vec<u8>, usize)>,
    members: Vec<Vec<usize>>,
    /// Bytes of commands in all jobs.
    bytes: usize,
    /// A reused buffer for the first job.
    spare: Option<Vec<u8>>,
}

impl Round {
    fn new(mut spare: Vec<u8>) -> Round {
        spare.clear();
        Round {
            jobs: Vec::new(),
            members: Vec::new(),
            bytes: 0,
            spare: Some(spare),
        }
    }

    /// Appends item `item`'s command (written by `write`) to `node`'s pipeline.
    fn push(&mut self, node: usize, item: usize, write: impl FnOnce(&mut Vec<u8>)) {
        let j = match self.jobs.iter().position(|j| j.0 == node) {
            Some(j) => j,
            None => {
                let buf = self.spare.take().unwrap_or_default();
                self.jobs.push((node, buf, 0));
                self.members.push(Vec::new());
                self.jobs.len() - 1
            }
        };
        let job = &mut self.jobs[j];
        let before = job.1.len();
        write(&mut job.1);
        self.bytes += job.1.len() - before;
        job.2 += 1;
        self.members[j].push(item);
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

/// One server's URL, parsed and checked: TCP or TLS with certificate checks only.
fn parse_url(url: &str) -> Result<redis::ConnectionInfo, Error> {
    let info = url
        .into_connection_info()
        .map_err(|e| bad("url", format!("{:?}: {e}", redact(url))))?;
    match info.addr {
        redis::ConnectionAddr::Tcp(..) => Ok(info),
        redis::ConnectionAddr::TcpTls { insecure: true, .. } => Err(bad(
            "url",
            "#insecure (TLS without certificate checks) is not supported; give the \
             server's CA as tls_ca instead"
                .into(),
        )),
        redis::ConnectionAddr::TcpTls { .. } => Ok(info),
        _ => Err(bad(
            "url",
            "only redis:// (TCP) and rediss:// (TLS) addresses are supported".into(),
        )),
    }
}

/// A client of one server; the store sends `AUTH` and `SELECT` itself (see [`Hello`]).
fn client_for(
    mut info: redis::ConnectionInfo,
    tls: Option<&redis::TlsCertificates>,
) -> Result<redis::Client, Error> {
    info.redis = redis::RedisConnectionInfo::default();
    match tls {
        Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
        None => redis::Client::open(info),
    }
    .map_err(|e| bad("url", e.to_string()))
}

/// The host of `host:port` (brackets of an IPv6 host removed).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
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
        // Cluster seed lists: database 0 only, TLS files only with a TLS scheme, and the
        // password redacted like a single server's.
        assert_eq!(
            redact("redis+cluster://u:pw@a:1,b:2"),
            "redis+cluster://u:***@a:1,b:2"
        );
        for url in [
            "redis+cluster://127.0.0.1:1/3",
            "redis+cluster://",
            "redis+cluster://x:y:z",
        ] {
            let err = RemoteStore::open(RemoteConfig::new(url, 1)).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { ref what, .. } if what == "url"),
                "{url}: {err}"
            );
        }
        let mut cfg = RemoteConfig::new("redis+cluster://127.0.0.1:1,127.0.0.1:2", 1);
        cfg.tls_ca = Some("ca.crt".into());
        assert!(RemoteStore::open(cfg).is_err());
        let s = RemoteStore::open(RemoteConfig::new("valkey+cluster://127.0.0.1:1", 1)).unwrap();
        assert!(s.is_cluster() && !s.is_connected());
        assert!(s
            .key(BlockKey {
                hash: 0xab,
                group: 3
            })
            .ends_with(":{00000000000000ab}:3"));
    }
}
