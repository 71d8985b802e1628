//! L4 remote store on a real Valkey/Redis Cluster (three primaries on loopback, started by
//! `scripts/remote-store.sh cluster start`): round trips across nodes, a primary killed
//! mid-run (its records are misses, never wrong bytes; the manager keeps serving), the node
//! restarted (empty: misses, then writes work again), a hung primary holding only its own
//! keys, and a slot migrated while in use (`ASK`, then `MOVED`).

mod common;
mod support;

use std::time::{Duration, Instant};

use common::{prompt_of, serve, Engine, B};
use kvalloc::tiers::{BlockKey, BlockStore, LowerCapacity, RemoteStore, StoreError, Tier};
use kvalloc::{Policy, Prompt};
use support::{random_bytes, remote_config, RemoteCluster, Rng};

fn key(hash: u64, group: u16) -> BlockKey {
    BlockKey { hash, group }
}

/// `2 * blocks` records: groups 0 and 1 of each block, of random geometry and bytes.
fn records(seed: u64, blocks: u64) -> Vec<(BlockKey, u32, Vec<u8>)> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for b in 0..blocks {
        let id = rng.below(u64::MAX);
        for g in 0..2u16 {
            let layers = 1 + rng.below(6) as u32;
            let lb = 16 * (1 + rng.below(200) as u32);
            let bytes = random_bytes(seed ^ (b << 1 | u64::from(g)), (layers * lb) as usize);
            out.push((key(id, g), lb, bytes));
        }
    }
    out
}

fn put_all(s: &mut RemoteStore, recs: &[(BlockKey, u32, Vec<u8>)]) -> Vec<Result<(), StoreError>> {
    let items: Vec<(BlockKey, u32, &[u8])> =
        recs.iter().map(|(k, lb, d)| (*k, *lb, &d[..])).collect();
    s.put_many(&items)
}

/// Reads a record: its exact bytes, or an error; never other bytes.
fn read(s: &mut RemoteStore, k: BlockKey, data: &[u8]) -> Result<(), StoreError> {
    let mut out = vec![0xa5; data.len()];
    let r = s.get(k, &mut out);
    if r.is_ok() {
        assert_eq!(out, data, "wrong bytes for {k:?}");
    }
    r
}

#[test]
fn records_round_trip_across_the_cluster() {
    let cluster = RemoteCluster::start(3);
    let recs = records(5, 100);
    for range_reads in [true, false] {
        let mut cfg = remote_config(cluster.url(), 21 + u64::from(range_reads));
        cfg.range_reads = range_reads;
        cfg.max_batch_bytes = 100_000; // several rounds per put_many
        let mut s = RemoteStore::connect(cfg).unwrap();
        assert!(s.is_cluster());
        assert!(put_all(&mut s, &recs).iter().all(|r| r.is_ok()));
        let mut rng = Rng(9);
        let mut owners = [0usize; 3];
        for (k, lb, data) in &recs {
            read(&mut s, *k, data).unwrap();
            let layers = (data.len() / *lb as usize) as u32;
            let first = rng.below(u64::from(layers)) as u32;
            let (a, b) = ((first * lb) as usize, data.len());
            let mut part = vec![0; b - a];
            s.get_layers(*k, first, &mut part).unwrap();
            assert_eq!(&part[..], &data[a..b]);
            owners[cluster.owner(&s.key(*k))] += 1;
        }
        // Every primary holds records; both groups of a block share a node.
        assert!(owners.iter().all(|&n| n > 0), "{owners:?}");
        for pair in recs.chunks(2) {
            assert_eq!(
                cluster.owner(&s.key(pair[0].0)),
                cluster.owner(&s.key(pair[1].0))
            );
        }
        let mut keys: Vec<BlockKey> = recs.iter().map(|r| r.0).collect();
        keys.push(key(1, 0));
        let found = s.contains_many(&keys).unwrap();
        assert!(found[..recs.len()].iter().all(|&f| f) && !found[recs.len()]);
        s.remove(recs[0].0).unwrap();
        assert_eq!(
            read(&mut s, recs[0].0, &recs[0].2),
            Err(StoreError::Missing)
        );
        let c = s.counters();
        assert_eq!((c.puts, c.unavailable, c.io_errors), (200, 0, 0), "{c:?}");
    }
}

#[test]
fn killed_primary_is_misses_never_wrong_bytes_then_restarted_empty() {
    let cluster = RemoteCluster::start(3);
    let mut cfg = remote_config(cluster.url(), 31);
    cfg.max_reconnect_interval = Duration::from_millis(200);
    let mut s = RemoteStore::connect(cfg).unwrap();
    let recs = records(6, 60);
    assert!(put_all(&mut s, &recs).iter().all(|r| r.is_ok()));
    let owner: Vec<usize> = recs.iter().map(|r| cluster.owner(&s.key(r.0))).collect();
    let dead = 1;
    cluster.kill(dead);
    let before = s.counters().unavailable;
    for ((k, _, data), &o) in recs.iter().zip(&owner) {
        match read(&mut s, *k, data) {
            Ok(()) => assert_ne!(o, dead, "{k:?} read from a dead node"),
            Err(StoreError::Unavailable(_)) => assert_eq!(o, dead, "{k:?} on a live node"),
            Err(e) => panic!("{k:?}: {e}"),
        }
    }
    // A lookup reports the dead node's records absent, the others present.
    let keys: Vec<BlockKey> = recs.iter().map(|r| r.0).collect();
    let found = s.contains_many(&keys).unwrap();
    for (&f, &o) in found.iter().zip(&owner) {
        assert_eq!(f, o != dead);
    }
    // Writes: the live nodes take theirs.
    let fresh = records(7, 30);
    for (r, (k, _, _)) in put_all(&mut s, &fresh).iter().zip(&fresh) {
        let o = cluster.owner(&s.key(*k));
        assert_eq!(r.is_ok(), o != dead, "{k:?}: {r:?}");
    }
    assert!(s.counters().unavailable > before);

    cluster.restart();
    // Past the node's back-off its records are gone (no persistence): misses, then it takes
    // writes again.
    let on_dead: Vec<&(BlockKey, u32, Vec<u8>)> = recs
        .iter()
        .zip(&owner)
        .filter(|(_, &o)| o == dead)
        .map(|(r, _)| r)
        .collect();
    assert!(!on_dead.is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    let (k, _, data) = on_dead[0];
    loop {
        match read(&mut s, *k, data) {
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => {
                assert_eq!(r, Err(StoreError::Missing));
                break;
            }
        }
    }
    let again: Vec<(BlockKey, u32, Vec<u8>)> = on_dead.iter().map(|r| (*r).clone()).collect();
    assert!(put_all(&mut s, &again).iter().all(|r| r.is_ok()));
    for (k, _, data) in &recs {
        read(&mut s, *k, data).unwrap();
    }
}

/// A hung primary (SIGSTOP) costs a call at most about its deadline, and the other nodes'
/// records in the same call are served.
#[test]
fn frozen_primary_holds_only_its_own_keys() {
    let cluster = RemoteCluster::start(3);
    let mut cfg = remote_config(cluster.url(), 41);
    cfg.timeout = Duration::from_millis(300);
    let mut s = RemoteStore::connect(cfg).unwrap();
    let recs = records(8, 45);
    assert!(put_all(&mut s, &recs).iter().all(|r| r.is_ok()));
    let owner: Vec<usize> = recs.iter().map(|r| cluster.owner(&s.key(r.0))).collect();
    cluster.signal(2, libc::SIGSTOP);
    let keys: Vec<BlockKey> = recs.iter().map(|r| r.0).collect();
    let t = Instant::now();
    let found = s.contains_many(&keys).unwrap();
    // A hang guard, ten deadlines long; not a timing target.
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    for (&f, &o) in found.iter().zip(&owner) {
        assert_eq!(f, o != 2);
    }
    let t = Instant::now();
    let results = put_all(&mut s, &recs);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    for (r, &o) in results.iter().zip(&owner) {
        assert_eq!(r.is_ok(), o != 2, "{r:?}");
    }
    let c = s.counters();
    assert!(c.timeouts > 0 && c.unavailable >= c.timeouts, "{c:?}");
    cluster.signal(2, libc::SIGCONT);
    // The late replies were dropped with the connection: every read is its own record.
    std::thread::sleep(Duration::from_millis(300)); // past the reconnect back-off
    for (k, _, data) in &recs {
        read(&mut s, *k, data).unwrap();
    }
}

/// A slot moved to another node while the store uses it: during the migration the moved keys
/// answer `ASK` (followed with `ASKING`), new keys of the slot go to the importing node; after
/// it, `MOVED` (followed, and the slot map updated).
#[test]
fn slot_migrated_while_in_use_follows_ask_then_moved() {
    let cluster = RemoteCluster::start(3);
    let mut s = RemoteStore::connect(remote_config(cluster.url(), 51)).unwrap();
    let recs = records(9, 1); // one block, groups 0 and 1: one slot
    assert!(put_all(&mut s, &recs).iter().all(|r| r.is_ok()));
    let k0 = s.key(recs[0].0);
    let src = cluster.owner(&k0);
    let dst = (src + 1) % 3;
    let id = |i: usize| -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut cluster.node(i))
            .unwrap()
    };
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&k0)
        .query(&mut cluster.node(0))
        .unwrap();
    let setslot = |node: usize, how: &str, to: &str| {
        let mut c = redis::cmd("CLUSTER");
        c.arg("SETSLOT").arg(slot).arg(how);
        if !to.is_empty() {
            c.arg(to);
        }
        c.exec(&mut cluster.node(node)).unwrap();
    };
    setslot(dst, "IMPORTING", &id(src));
    setslot(src, "MIGRATING", &id(dst));
    let migrate = |k: &str| {
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(cluster.ports[dst])
            .arg(k)
            .arg(0)
            .arg(5000)
            .exec(&mut cluster.node(src))
            .unwrap();
    };
    migrate(&k0);
    // Group 0 moved (ASK), group 1 not yet (served by the source).
    for (k, _, data) in &recs {
        read(&mut s, *k, data).unwrap();
    }
    // A new key of the slot (group 2 of the block) goes to the importing node.
    let g2 = (key(recs[0].0.hash, 2), 64, random_bytes(99, 256));
    assert!(put_all(&mut s, std::slice::from_ref(&g2))[0].is_ok());
    let mut importing = cluster.node(dst);
    redis::cmd("ASKING").exec(&mut importing).unwrap(); // the slot is not its yet
    let exists: i64 = redis::cmd("EXISTS")
        .arg(s.key(g2.0))
        .query(&mut importing)
        .unwrap();
    assert_eq!(exists, 1, "written on the importing node");
    read(&mut s, g2.0, &g2.2).unwrap();
    migrate(&s.key(recs[1].0));
    for node in 0..3 {
        setslot(node, "NODE", &id(dst));
    }
    // MOVED now, for reads, lookups and writes of the slot.
    let all = [recs.clone(), vec![g2]].concat();
    for (k, _, data) in &all {
        read(&mut s, *k, data).unwrap();
    }
    // The slot map was updated: the source redirects nothing more.
    let moved = || -> String {
        let info: String = redis::cmd("INFO")
            .arg("errorstats")
            .query(&mut cluster.node(src))
            .unwrap();
        info.lines()
            .find(|l| l.starts_with("errorstat_MOVED"))
            .unwrap_or("")
            .to_string()
    };
    let after_first = moved();
    assert!(!after_first.is_empty(), "MOVED was answered");
    let keys: Vec<BlockKey> = all.iter().map(|r| r.0).collect();
    assert!(s.contains_many(&keys).unwrap().iter().all(|&f| f));
    assert!(put_all(&mut s, &all).iter().all(|r| r.is_ok()));
    for (k, _, data) in &all {
        read(&mut s, *k, data).unwrap();
    }
    assert_eq!(moved(), after_first);
    let c = s.counters();
    assert_eq!((c.unavailable, c.io_errors), (0, 0), "{c:?}");
    assert_eq!(cluster.slot_owner(slot as u16), dst);
}

fn ns() -> u64 {
    kvalloc::tiers::namespace(&common::small_spec(), B as u32)
}

fn cluster_engine(cluster: &RemoteCluster, max_reconnect: Duration) -> Engine {
    let mut cfg = remote_config(cluster.url(), ns());
    cfg.max_reconnect_interval = max_reconnect;
    let store: Box<dyn BlockStore> = Box::new(RemoteStore::open(cfg).unwrap());
    Engine::with_stores(
        Policy::SwaAware,
        96 << 10,
        LowerCapacity {
            host: 32 << 10,
            disk: 0,
            remote: 64 << 20,
        },
        None,
        Some(store),
        false,
    )
}

/// Through the manager, with real bytes (every hit's bytes are checked): a primary killed
/// mid-run is misses, admission goes on and `validate()` passes; after its restart the remote
/// tier serves hits again.
#[test]
fn manager_keeps_serving_when_a_primary_dies() {
    let cluster = RemoteCluster::start(3);
    let mut e = cluster_engine(&cluster, Duration::from_millis(200));
    for f in 0..10u8 {
        serve(&mut e, u64::from(f) + 1, &prompt_of(f, 3, 0));
    }
    cluster.kill(0);
    for f in 0..30u8 {
        // Prompts whose prefixes went to the remote tier, and new ones.
        let prompt = if f < 10 {
            prompt_of(f, 4, 0)
        } else {
            prompt_of(f, 3, 0)
        };
        serve(&mut e, u64::from(f) + 100, &prompt).expect("admission never fails for the store");
        e.m.validate().unwrap();
    }
    let st = e.m.stats();
    let remote = st.tiers.iter().find(|t| t.tier == Tier::Remote).unwrap();
    assert!(remote.store.unwrap().unavailable > 0, "{remote:?}");
    cluster.restart();
    std::thread::sleep(Duration::from_millis(300)); // past the reconnect back-off
    serve(&mut e, 500, &prompt_of(50, 3, 0));
    for f in 60..80u8 {
        serve(&mut e, u64::from(f) + 500, &prompt_of(f, 3, 0));
    }
    let next = prompt_of(50, 4, 0);
    let h = e.m.match_prefix_tiers(Prompt::Tokens(&next), None).unwrap();
    assert_eq!(
        h[3],
        (48 + 120) / B as u64 * B as u64,
        "served from the remote tier again: {h:?}"
    );
    assert_eq!(serve(&mut e, 900, &next), Some(h[3]));
    e.m.validate().unwrap();
}

/// A dead primary's slot taken over by another node (as a replica's promotion would): the
/// store learns the new owner from a live node (it reloads the slot map after a node fails),
/// where a client that waited for a `MOVED` would never hear of it.
#[test]
fn slot_taken_over_from_a_dead_primary_is_learned() {
    let cluster = RemoteCluster::start(3);
    let mut s = RemoteStore::connect(remote_config(cluster.url(), 61)).unwrap();
    let recs = records(10, 1);
    assert!(put_all(&mut s, &recs).iter().all(|r| r.is_ok()));
    let k0 = s.key(recs[0].0);
    let dead = cluster.owner(&k0);
    let heir = (dead + 1) % 3;
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(&k0)
        .query(&mut cluster.node(heir))
        .unwrap();
    let heir_id: String = redis::cmd("CLUSTER")
        .arg("MYID")
        .query(&mut cluster.node(heir))
        .unwrap();
    cluster.kill(dead);
    assert!(matches!(
        read(&mut s, recs[0].0, &recs[0].2),
        Err(StoreError::Unavailable(_))
    ));
    for node in (0..3).filter(|&n| n != dead) {
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("NODE")
            .arg(&heir_id)
            .exec(&mut cluster.node(node))
            .unwrap();
    }
    // Past the reload interval the heir serves the slot: the records are gone (misses), and
    // it takes writes.
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        match read(&mut s, recs[0].0, &recs[0].2) {
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => break r,
        }
    };
    assert_eq!(r, Err(StoreError::Missing));
    assert!(put_all(&mut s, &recs).iter().all(|r| r.is_ok()));
    for (k, _, data) in &recs {
        read(&mut s, *k, data).unwrap();
    }
    assert_eq!(cluster.owner(&k0), heir);
}
