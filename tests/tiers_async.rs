//! Background promotion from disk and the remote store, with real bytes: admissions that wait
//! for their KV while others run, loads that settle later, re-admissions, aborts of waiting
//! requests, torn records, and a frozen, slow or killed server. Every hit's bytes are checked
//! against the prefix that wrote them, and the manager is validated after every operation.

mod common;
mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{prompt_of, Engine, B};
use kvalloc::tiers::{BlockStore, DiskStore, LowerCapacity, RemoteStore};
use kvalloc::{LoadPolicy, ManagerConfig, Prompt};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use support::{remote_config, RemoteServer, Rng, TempDir};

fn ns() -> u64 {
    kvalloc::tiers::namespace(&common::small_spec(), B as u32)
}

fn config(host: u64, disk: u64, remote: u64) -> ManagerConfig {
    ManagerConfig {
        lower: LowerCapacity { host, disk, remote },
        load_policy: LoadPolicy::Always,
        ..ManagerConfig::default()
    }
}

/// An engine over a small L1, a small host tier and a disk tier in `dir`.
fn disk_engine(dir: &std::path::Path, cfg: ManagerConfig) -> Engine {
    let store: Box<dyn BlockStore> = Box::new(DiskStore::open(dir, ns()).unwrap());
    Engine::with_config(cfg, 96 << 10, Some(store), None)
}

/// An engine over a small L1 and host tier and the remote store at `url`, each call's
/// deadline `timeout`.
fn remote_engine(url: String, timeout: Duration, cfg: ManagerConfig) -> Engine {
    let mut rc = remote_config(url, ns());
    rc.timeout = timeout;
    rc.max_reconnect_interval = Duration::from_millis(100);
    let store: Box<dyn BlockStore> = Box::new(RemoteStore::open(rc).unwrap());
    Engine::with_config(cfg, 96 << 10, None, Some(store))
}

/// Drives an engine the way a scheduler does: admissions that wait for KV are set aside and
/// admitted again when ready, while other requests come and go.
struct Driver {
    e: Engine,
    next: u64,
    running: Vec<u64>,
    waiting: HashMap<u64, Vec<i64>>,
    hits: u64,
}

impl Driver {
    fn new(e: Engine) -> Self {
        Driver {
            e,
            next: 0,
            running: Vec::new(),
            waiting: HashMap::new(),
            hits: 0,
        }
    }

    /// Admits `prompt` as request `id`: running (bytes checked, the rest written), waiting
    /// for its KV, or refused.
    fn admit(&mut self, id: u64, prompt: Vec<i64>) -> Result<(), TestCaseError> {
        match self
            .e
            .m
            .admit(id, Prompt::Tokens(&prompt), None, None)
            .unwrap()
        {
            Some(hit) => {
                self.e.check_and_fill(id, &prompt, hit)?;
                self.hits += hit;
                self.running.push(id);
            }
            None if self.e.m.waiting_for_kv(id) => {
                prop_assert!(!self.e.m.is_running(id));
                self.waiting.insert(id, prompt);
            }
            None => {}
        }
        Ok(())
    }

    fn admit_new(&mut self, prompt: Vec<i64>) -> Result<(), TestCaseError> {
        self.next += 1;
        self.admit(self.next, prompt)
    }

    /// Admits again every request whose load settled.
    fn poll(&mut self) -> Result<(), TestCaseError> {
        for id in self.e.m.take_ready() {
            let prompt = self
                .waiting
                .remove(&id)
                .expect("a ready request was waiting");
            self.admit(id, prompt)?;
        }
        Ok(())
    }

    fn finish(&mut self, k: usize) {
        if !self.running.is_empty() {
            let id = self.running.swap_remove(k % self.running.len());
            self.e.m.finish(id).unwrap();
        }
    }

    fn abort_waiting(&mut self, k: usize) {
        let mut ids: Vec<u64> = self.waiting.keys().copied().collect();
        ids.sort_unstable();
        if !ids.is_empty() {
            let id = ids[k % ids.len()];
            self.e.m.abort(id).unwrap();
            self.waiting.remove(&id);
            assert!(!self.e.m.waiting_for_kv(id));
        }
    }

    /// Lets every load settle and every request end.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.waiting.is_empty() {
            prop_assert!(Instant::now() < deadline, "loads never settled");
            let ids: Vec<u64> = self.waiting.keys().copied().collect();
            for id in ids {
                self.e.m.wait_for_kv(id, Some(Duration::from_millis(50)));
            }
            self.poll()?;
        }
        while !self.running.is_empty() {
            self.finish(0);
        }
        self.e.m.validate().unwrap();
        prop_assert_eq!(self.e.m.num_waiting(), 0);
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Op {
    Admit {
        family: u8,
        turns: u8,
        tail: u8,
    },
    Poll,
    Finish(usize),
    AbortWaiting(usize),
    /// Flips a byte in the n-th record file on disk (a torn or rotten record).
    Tear(usize),
    Sleep(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..8, 1u8..5, 0u8..20).prop_map(|(family, turns, tail)| Op::Admit { family, turns, tail }),
        3 => Just(Op::Poll),
        3 => any::<usize>().prop_map(Op::Finish),
        1 => any::<usize>().prop_map(Op::AbortWaiting),
        1 => any::<usize>().prop_map(Op::Tear),
        1 => (0u8..3).prop_map(Op::Sleep),
    ]
}

fn records(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(records(&p));
        } else if p.extension().is_none_or(|x| x != "lock") && !p.ends_with(".lock") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn tear(dir: &std::path::Path, n: usize) {
    let files: Vec<_> = records(dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|f| f != ".lock"))
        .collect();
    if files.is_empty() {
        return;
    }
    let f = &files[n % files.len()];
    if let Ok(mut data) = std::fs::read(f) {
        if !data.is_empty() {
            let at = (n / files.len()) % data.len();
            data[at] ^= 0x41;
            let _ = std::fs::write(f, data);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random interleavings over L1, a small host tier and a disk tier read in the background
    /// (torn records among them): a block that is still loading is never served (another
    /// request's bytes there would fail the check), every hit's bytes are right, and the
    /// invariants hold after every operation.
    #[test]
    fn background_disk_loads_never_serve_a_wrong_byte(ops in proptest::collection::vec(op(), 1..120)) {
        let dir = TempDir::new("kvalloc-async-disk");
        let mut d = Driver::new(disk_engine(dir.path(), config(16 << 10, 64 << 20, 0)));
        for op in ops {
            match op {
                Op::Admit { family, turns, tail } => d.admit_new(prompt_of(family, turns, tail))?,
                Op::Poll => d.poll()?,
                Op::Finish(k) => d.finish(k),
                Op::AbortWaiting(k) => d.abort_waiting(k),
                Op::Tear(n) => tear(dir.path(), n),
                Op::Sleep(ms) => std::thread::sleep(Duration::from_millis(u64::from(ms))),
            }
            d.e.m.validate().unwrap();
        }
        d.drain()?;
    }
}

/// Background loads actually happen in that model: a conversation pushed down to disk comes
/// back through a wait, and its next turn's hit covers it.
#[test]
fn a_disk_hit_waits_then_serves_the_whole_prefix() {
    let dir = TempDir::new("kvalloc-async-wait");
    let mut d = Driver::new(disk_engine(dir.path(), config(0, 64 << 20, 0)));
    let first = prompt_of(0, 3, 0);
    d.admit_new(first.clone()).unwrap();
    d.finish(0);
    for f in 10..30 {
        d.admit_new(prompt_of(f, 2, 0)).unwrap();
        d.finish(0);
    }
    let next = prompt_of(0, 4, 0);
    let tiers =
        d.e.m
            .match_prefix_tiers(Prompt::Tokens(&next), None)
            .unwrap();
    assert!(tiers[2] > tiers[0], "{tiers:?}");
    let id = 1000;
    assert_eq!(
        d.e.m.admit(id, Prompt::Tokens(&next), None, None).unwrap(),
        None
    );
    assert!(d.e.m.waiting_for_kv(id));
    assert!(!d.e.m.is_running(id));
    d.e.m.validate().unwrap();
    // Admitting it again while it loads answers "waiting" again.
    assert!(d.e.m.wait_for_kv(id, Some(Duration::from_secs(10))));
    assert!(!d.e.m.waiting_for_kv(id));
    let hit = d.e.m.admit(id, Prompt::Tokens(&next), None, None).unwrap();
    assert_eq!(hit, Some(tiers[2]));
    d.e.check_and_fill(id, &next, tiers[2]).unwrap();
    let st = d.e.m.load_stats();
    assert_eq!((st.started, st.verified, st.failed), (1, 1, 0), "{st:?}");
    d.e.m.finish(id).unwrap();
    d.e.m.validate().unwrap();
}

/// Fills the remote store with conversations 0..6 (then pushed out of L1 and host memory).
fn fill_remote(d: &mut Driver) {
    for f in 0..6u8 {
        d.admit_new(prompt_of(f, 3, 0)).unwrap();
        d.finish(0);
    }
    for f in 10..30u8 {
        d.admit_new(prompt_of(f, 2, 0)).unwrap();
        d.finish(0);
    }
}

/// Two requests that need the same records share one load (kept in flight by a frozen
/// server); aborting one leaves the other's.
#[test]
fn requests_needing_the_same_records_share_one_load() {
    let server = RemoteServer::start(&[]);
    let cfg = ManagerConfig {
        load_deadline: Duration::from_secs(20),
        ..config(0, 0, 64 << 20)
    };
    let mut d = Driver::new(remote_engine(server.url(), Duration::from_secs(10), cfg));
    fill_remote(&mut d);
    let a = prompt_of(0, 4, 0);
    let mut b = prompt_of(0, 3, 0);
    b.extend(500..540);
    let mut c = prompt_of(0, 3, 0);
    c.extend(600..640);
    server.signal(libc::SIGSTOP);
    for (id, p) in [(1000, &a), (1001, &b), (1002, &c)] {
        assert_eq!(
            d.e.m.admit(id, Prompt::Tokens(p), None, None).unwrap(),
            None
        );
        assert!(d.e.m.waiting_for_kv(id));
    }
    assert_eq!(d.e.m.load_stats().started, 1, "one load for the three");
    d.e.m.abort(1002).unwrap();
    assert!(!d.e.m.waiting_for_kv(1002));
    d.e.m.validate().unwrap();
    server.signal(libc::SIGCONT);
    assert!(d.e.m.wait_for_kv(1000, Some(Duration::from_secs(15))));
    let mut ready = d.e.m.take_ready();
    ready.sort_unstable();
    assert_eq!(ready, vec![1000, 1001]);
    for (id, p) in [(1000, &a), (1001, &b)] {
        let hit =
            d.e.m
                .admit(id, Prompt::Tokens(p), None, None)
                .unwrap()
                .unwrap();
        assert_eq!(hit, (48 + 120) / B as u64 * B as u64);
        d.e.check_and_fill(id, p, hit).unwrap();
    }
    d.e.m.validate().unwrap();
}

/// A server frozen (SIGSTOP) while a load is in flight: the load settles at its deadline,
/// the request's hit shrinks to what verified, and the scheduler never waited on the server.
#[test]
fn a_frozen_server_mid_load_shrinks_the_hit_never_the_bytes() {
    let server = RemoteServer::start(&[]);
    let cfg = ManagerConfig {
        load_deadline: Duration::from_millis(100),
        ..config(16 << 10, 0, 64 << 20)
    };
    let mut d = Driver::new(remote_engine(server.url(), Duration::from_secs(2), cfg));
    fill_remote(&mut d);
    let next = prompt_of(0, 4, 0);
    let tiers =
        d.e.m
            .match_prefix_tiers(Prompt::Tokens(&next), None)
            .unwrap();
    assert!(tiers[3] > tiers[1], "{tiers:?}");
    server.signal(libc::SIGSTOP);
    let t = Instant::now();
    assert_eq!(
        d.e.m.admit(7, Prompt::Tokens(&next), None, None).unwrap(),
        None
    );
    // Other requests come and go meanwhile.
    for f in 40..44u8 {
        d.admit_new(prompt_of(f, 2, 0)).unwrap();
        d.finish(0);
    }
    // A hang guard (the store's deadline is 2 s), not a timing target.
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert!(d.e.m.waiting_for_kv(7));
    assert!(d.e.m.wait_for_kv(7, Some(Duration::from_secs(10))));
    let hit =
        d.e.m
            .admit(7, Prompt::Tokens(&next), None, None)
            .unwrap()
            .unwrap();
    assert!(hit < tiers[3], "hit {hit} of {tiers:?}");
    d.e.check_and_fill(7, &next, hit).unwrap();
    let st = d.e.m.load_stats();
    assert_eq!(st.timed_out, 1, "{st:?}");
    d.e.m.finish(7).unwrap();
    d.e.m.validate().unwrap();
    server.signal(libc::SIGCONT);
}

/// A load slower than its deadline (the server thaws after it): the late read must not land
/// in pages the load gave back, which other requests now hold.
#[test]
fn a_load_past_its_deadline_never_writes_late() {
    let server = RemoteServer::start(&[]);
    let cfg = ManagerConfig {
        load_deadline: Duration::from_millis(30),
        ..config(0, 0, 64 << 20)
    };
    let mut d = Driver::new(remote_engine(server.url(), Duration::from_secs(5), cfg));
    fill_remote(&mut d);
    let next = prompt_of(1, 4, 0);
    server.signal(libc::SIGSTOP);
    assert_eq!(
        d.e.m.admit(7, Prompt::Tokens(&next), None, None).unwrap(),
        None
    );
    d.waiting.insert(7, next);
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(d.e.m.take_ready(), vec![7]);
    d.waiting.remove(&7);
    d.e.m.abort(7).unwrap();
    assert_eq!(d.e.m.load_stats().timed_out, 1);
    // The pages the load had go to other requests, which write their own bytes there.
    let mut others = Vec::new();
    for f in 50..54u8 {
        let p = prompt_of(f, 2, 0);
        d.admit_new(p.clone()).unwrap();
        others.push((d.next, p));
    }
    server.signal(libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(200)); // the late reply arrives and is dropped
    for (id, p) in others {
        if d.e.m.is_running(id) {
            // Every page of theirs still holds what they wrote (all their whole blocks are
            // checked as if cached).
            let whole = p.len() as u64 / B as u64 * B as u64;
            d.e.check_and_fill(id, &p, whole).unwrap();
        }
    }
    d.e.m.validate().unwrap();
    d.drain().unwrap();
}

/// Random interleavings while the server is frozen, thawed, killed and restarted: loads time
/// out, fail or verify; every hit's bytes are right.
#[test]
fn frozen_and_killed_servers_under_random_traffic() {
    let mut server = RemoteServer::start(&[]);
    let cfg = ManagerConfig {
        load_deadline: Duration::from_millis(20),
        load_policy: LoadPolicy::Decide,
        ..config(16 << 10, 0, 64 << 20)
    };
    let mut d = Driver::new(remote_engine(server.url(), Duration::from_millis(30), cfg));
    fill_remote(&mut d);
    let mut rng = Rng(0x5eed_2500);
    let mut frozen = false;
    for step in 0..400u32 {
        match rng.below(20) {
            0..=8 => {
                let f = rng.below(10) as u8;
                let turns = 1 + rng.below(4) as u8;
                d.admit_new(prompt_of(f, turns, rng.below(20) as u8))
                    .unwrap();
            }
            9..=12 => d.poll().unwrap(),
            13..=16 => d.finish(rng.below(64) as usize),
            17 => d.abort_waiting(rng.below(64) as usize),
            18 => {
                server.signal(if frozen { libc::SIGCONT } else { libc::SIGSTOP });
                frozen = !frozen;
            }
            _ if step % 97 == 0 && !frozen => server.restart(),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
        d.e.m.validate().unwrap();
    }
    if frozen {
        server.signal(libc::SIGCONT);
    }
    d.drain().unwrap();
    let st = d.e.m.load_stats();
    assert!(st.started > 0, "{st:?}");
}
