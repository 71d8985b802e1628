//! Tiers under faults, through the manager, with real bytes: residency model runs over a real
//! disk store and a real remote server, a full disk, a killed server, a corrupted record.
//! Every hit's bytes are checked against what the engine wrote; `validate()` after every step.

mod common;
mod support;

use common::{churn, prompt_of, serve, Engine, B};
use kvalloc::tiers::{BlockStore, DiskStore, LowerCapacity, RemoteConfig, RemoteStore, Tier};
use kvalloc::{LoadPolicy, ManagerConfig, Policy, Prompt};
use proptest::prelude::*;
use std::time::{Duration, Instant};
use support::{remote_config, RemoteServer, TempDir, Tmpfs};

fn ns() -> u64 {
    kvalloc::tiers::namespace(&common::small_spec(), B as u32)
}

fn disk_engine(dir: &std::path::Path, host: u64, disk: u64) -> Engine {
    let store: Box<dyn BlockStore> = Box::new(DiskStore::open(dir, ns()).unwrap());
    Engine::with_stores(
        Policy::SwaAware,
        96 << 10,
        LowerCapacity {
            host,
            disk,
            remote: 0,
        },
        Some(store),
        None,
        false,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Random conversations over L1, a small host tier and a small disk tier: records move
    /// host -> disk and come back; every hit's bytes are right.
    #[test]
    fn bytes_survive_host_and_disk(turns in prop::collection::vec((0u8..8, 1u8..6), 1..40)) {
        let dir = TempDir::new("kvalloc-tiers-model");
        let mut e = disk_engine(dir.path(), 48 << 10, 256 << 10);
        let mut id = 0;
        for (family, t) in turns {
            id += 1;
            serve(&mut e, id, &prompt_of(family, t, 0));
            e.m.validate().map_err(|x| TestCaseError::fail(x.to_string()))?;
        }
        e.m.wait_loads();
        e.m.validate().map_err(|x| TestCaseError::fail(x.to_string()))?;
    }
}

#[test]
fn full_disk_skips_writes_and_keeps_serving() {
    let fs = Tmpfs::mount(256 << 10);
    // The disk tier believes it has 64 MiB; the filesystem holds 256 KiB.
    let mut e = disk_engine(fs.path(), 0, 64 << 20);
    for f in 0..40u8 {
        serve(&mut e, u64::from(f) + 1, &prompt_of(f, 3, 0));
        e.m.validate().unwrap();
    }
    let st = e.m.stats();
    let disk = st.tiers.iter().find(|t| t.tier == Tier::Disk).unwrap();
    assert!(disk.store.unwrap().writes_skipped_full > 0, "{disk:?}");
    assert!(disk.counters.write_failures > 0);
    // What did fit still serves, with the right bytes.
    assert!(serve(&mut e, 1000, &prompt_of(39, 4, 0)).is_some());
}

#[test]
fn corrupted_disk_record_is_a_miss() {
    let dir = TempDir::new("kvalloc-tiers-corrupt");
    let mut e = disk_engine(dir.path(), 0, 64 << 20);
    serve(&mut e, 1, &prompt_of(0, 3, 0));
    churn(&mut e, 10, 10..30, 2);
    let next = prompt_of(0, 4, 0);
    let before = e.m.match_prefix_tiers(Prompt::Tokens(&next), None).unwrap();
    assert!(before[2] > before[0], "{before:?}");
    for entry in walk(dir.path()) {
        let mut data = std::fs::read(&entry).unwrap();
        let n = data.len();
        data[n - 1] ^= 0x5a;
        std::fs::write(&entry, data).unwrap();
    }
    let hit = serve(&mut e, 100, &next).unwrap(); // bytes checked inside
    assert!(hit < before[2]);
    let st = e.m.stats();
    assert!(st.promotion_failures > 0);
    assert!(st.tiers[0].store.unwrap().checksum_failures > 0);
    e.m.validate().unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "kvb") {
            out.push(p);
        }
    }
    out
}

fn remote_engine(server: &RemoteServer, write_through: bool) -> Engine {
    remote_engine_with(remote_config(server.url(), ns()), write_through)
}

fn remote_engine_with(cfg: RemoteConfig, write_through: bool) -> Engine {
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
        write_through,
    )
}

#[test]
fn killed_remote_server_is_misses_not_errors_then_service_resumes() {
    let mut server = RemoteServer::start(&[]);
    let mut e = remote_engine(&server, false);
    for f in 0..10u8 {
        serve(&mut e, u64::from(f) + 1, &prompt_of(f, 3, 0));
    }
    server.kill();
    for f in 10..30u8 {
        serve(&mut e, u64::from(f) + 1, &prompt_of(f, 3, 0))
            .expect("admission never fails for the store");
        e.m.validate().unwrap();
    }
    let st = e.m.stats();
    let remote = st.tiers.iter().find(|t| t.tier == Tier::Remote).unwrap();
    assert!(remote.store.unwrap().unavailable > 0);
    server.restart();
    std::thread::sleep(std::time::Duration::from_millis(2500)); // past the reconnect back-off
    serve(&mut e, 500, &prompt_of(50, 3, 0));
    for f in 60..80u8 {
        serve(&mut e, u64::from(f) + 500, &prompt_of(f, 3, 0));
    }
    let next = prompt_of(50, 4, 0);
    let h = e.m.match_prefix_tiers(Prompt::Tokens(&next), None).unwrap();
    assert_eq!(
        h[3],
        (48 + 120) / B as u64 * B as u64,
        "served from the remote store again: {h:?}"
    );
    assert_eq!(serve(&mut e, 900, &next), Some(h[3]));
}

/// A hung remote server (SIGSTOP) holds no admission for long: its lookups, reads and writes
/// are counted timeouts (misses, failed writes), every hit's bytes are still right, and the
/// remote tier serves again after SIGCONT.
#[test]
fn frozen_remote_server_is_misses_then_service_resumes() {
    let server = RemoteServer::start(&[]);
    let mut cfg = remote_config(server.url(), ns());
    // Long enough that waiting it once per reply of a lookup's pipeline (as the redis crate's
    // pipeline read did: tens of keys) would pass the hang guard below many times over.
    cfg.timeout = Duration::from_millis(500);
    cfg.max_reconnect_interval = Duration::from_millis(200);
    // Loads every hit the store offers: the load-or-recompute decision would decline the
    // remote tier for a while after the freeze (its own test is below).
    let store: Box<dyn BlockStore> = Box::new(RemoteStore::open(cfg).unwrap());
    let mut e = Engine::with_config(
        ManagerConfig {
            lower: LowerCapacity {
                host: 32 << 10,
                disk: 0,
                remote: 64 << 20,
            },
            load_policy: LoadPolicy::Always,
            ..ManagerConfig::default()
        },
        96 << 10,
        None,
        Some(store),
    );
    for f in 0..6u8 {
        serve(&mut e, u64::from(f) + 1, &prompt_of(f, 3, 0));
    }
    churn(&mut e, 100, 10..30, 2);
    server.signal(libc::SIGSTOP);
    // A lookup of a prompt unknown here asks the store about each of its blocks in one call.
    let t = Instant::now();
    let fresh = prompt_of(99, 6, 0);
    let h =
        e.m.match_prefix_tiers(Prompt::Tokens(&fresh), None)
            .unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(h[3] <= 48, "nothing past the shared system prompt: {h:?}");
    for f in 0..12u8 {
        let t = Instant::now();
        let prompt = if f % 2 == 0 {
            prompt_of(f / 2, 4, 0) // its prefix is in the remote tier
        } else {
            prompt_of(40 + f, 3, 0)
        };
        serve(&mut e, 200 + u64::from(f), &prompt).expect("admission goes on");
        // A hang guard, six deadlines long; not a timing target.
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        e.m.validate().unwrap();
    }
    let st = e.m.stats();
    let remote = st.tiers.iter().find(|t| t.tier == Tier::Remote).unwrap();
    let store = remote.store.unwrap();
    assert!(
        store.timeouts > 0 && store.unavailable >= store.timeouts,
        "{store:?}"
    );
    server.signal(libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(300)); // past the reconnect back-off
    serve(&mut e, 500, &prompt_of(60, 3, 0));
    churn(&mut e, 600, 70..90, 2);
    let next = prompt_of(60, 4, 0);
    let h = e.m.match_prefix_tiers(Prompt::Tokens(&next), None).unwrap();
    assert_eq!(h[3], (48 + 120) / B as u64 * B as u64, "{h:?}");
    assert_eq!(serve(&mut e, 900, &next), Some(h[3]));
}

#[test]
fn two_instances_share_one_remote_store() {
    let server = RemoteServer::start(&[]);
    let mut writer = remote_engine(&server, true);
    let mut reader = remote_engine(&server, false);
    serve(&mut writer, 1, &prompt_of(3, 3, 0));
    let next = prompt_of(3, 4, 0);
    let h = reader
        .m
        .match_prefix_tiers(Prompt::Tokens(&next), None)
        .unwrap();
    assert_eq!(h[0], 0);
    assert_eq!(h[3], 160, "{h:?}");
    // The reader's device buffer receives the writer's bytes.
    assert_eq!(serve(&mut reader, 1, &next), Some(160));
    let st = reader.m.stats();
    assert!(st
        .tiers
        .iter()
        .any(|t| t.tier == Tier::Remote && t.promoted_tokens > 0));
}

/// A new record the host tier cannot take (here: one slab, and a checkpoint block needs a slab
/// per group) goes to the disk tier below instead of being lost.
#[test]
fn record_the_host_cannot_take_goes_to_disk() {
    let dir = TempDir::new("kvalloc-tiers-fallthrough");
    let mut e = disk_engine(dir.path(), 3 << 10, 64 << 20);
    serve(&mut e, 1, &prompt_of(0, 3, 0));
    churn(&mut e, 10, 10..30, 2);
    let next = prompt_of(0, 4, 0);
    let h = e.m.match_prefix_tiers(Prompt::Tokens(&next), None).unwrap();
    assert_eq!(h[2], 160, "the whole previous prompt is below L1: {h:?}");
    assert_eq!(serve(&mut e, 100, &next), Some(160));
}

/// An admission that cannot fit does not promote first: no lower-tier bytes are read and
/// nothing in L1 is evicted for a copy nobody will use.
#[test]
fn refused_admission_promotes_nothing() {
    let mut e = Engine::with_host(Policy::SwaAware, 1 << 20);
    serve(&mut e, 1, &prompt_of(0, 3, 0));
    churn(&mut e, 10, 10..30, 2);
    let next = prompt_of(0, 4, 0);
    assert_eq!(
        e.m.match_prefix_tiers(Prompt::Tokens(&next), None).unwrap()[1],
        160
    );
    // A long running request takes most of L1.
    let long: Vec<i64> = (0..1200).map(|i| 7_000_000 + i).collect();
    assert!(e.admit(500, &long).unwrap().is_some());
    let read_before = e.m.stats().tiers[0].counters.bytes_read;
    assert_eq!(e.admit(501, &next).unwrap(), None);
    let st = e.m.stats();
    assert_eq!(
        st.tiers[0].counters.bytes_read, read_before,
        "no promotion for a refused admission"
    );
    assert_eq!(st.tiers[0].promoted_tokens, 0);
    e.m.validate().unwrap();
}
