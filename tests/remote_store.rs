//! L4 remote store against a real Valkey/Redis server on loopback (issue #4): round trips,
//! a killed and restarted server, credentials, namespaces, server OOM, corruption.

mod support;

use std::time::{Duration, Instant};

use kvalloc::tiers::{BlockKey, BlockStore, RemoteStore, StoreError};
use support::{random_bytes, remote_config, retry_until_up, RemoteServer, Rng};

fn key(hash: u64, group: u16) -> BlockKey {
    BlockKey { hash, group }
}

fn store(server: &RemoteServer, namespace: u64) -> RemoteStore {
    RemoteStore::connect(remote_config(server.url(), namespace)).unwrap()
}

/// Raw access to the server, to damage values behind the store's back.
fn raw(server: &RemoteServer) -> redis::Connection {
    redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

#[test]
fn random_records_round_trip_with_both_read_modes() {
    let server = RemoteServer::start(&[]);
    for range_reads in [true, false] {
        let mut cfg = remote_config(server.url(), 11);
        cfg.range_reads = range_reads;
        cfg.max_batch_bytes = 200_000; // several pipelines per put_many
        let mut s = RemoteStore::connect(cfg).unwrap();
        let mut rng = Rng(77 + u64::from(range_reads));
        let records: Vec<(BlockKey, u32, Vec<u8>)> = (0..20u64)
            .map(|i| {
                let layers = 1 + rng.below(10) as u32;
                let lb = 16 * (1 + rng.below(800) as u32);
                (
                    key(rng.below(u64::MAX), (i % 2) as u16),
                    lb,
                    random_bytes(i, (layers * lb) as usize),
                )
            })
            .collect();
        let items: Vec<(BlockKey, u32, &[u8])> =
            records.iter().map(|(k, lb, d)| (*k, *lb, &d[..])).collect();
        assert!(s.put_many(&items).iter().all(|r| r.is_ok()));
        for (k, lb, data) in &records {
            let mut out = vec![0; data.len()];
            s.get(*k, &mut out).unwrap();
            assert_eq!(&out, data);
            let layers = (data.len() / *lb as usize) as u32;
            let first = rng.below(u64::from(layers)) as u32;
            let n = 1 + rng.below(u64::from(layers - first)) as u32;
            let (a, b) = ((first * lb) as usize, ((first + n) * lb) as usize);
            let mut part = vec![0; b - a];
            s.get_layers(*k, first, &mut part).unwrap();
            assert_eq!(&part[..], &data[a..b]);
        }
        let keys: Vec<BlockKey> = records.iter().map(|r| r.0).collect();
        assert_eq!(s.contains_many(&keys).unwrap(), vec![true; keys.len()]);
        s.remove(keys[0]).unwrap();
        let mut out = vec![0; records[0].2.len()];
        assert_eq!(s.get(keys[0], &mut out), Err(StoreError::Missing));
        assert_eq!(s.contains_many(&keys[..2]).unwrap(), vec![false, true]);
        let c = s.counters();
        assert_eq!(
            (c.puts, c.gets, c.unavailable, c.checksum_failures),
            (20, 40, 0, 0)
        );
    }
}

/// Range reads guess a group's geometry from the last record read; records of another
/// geometry in the same group (longer or shorter headers) must still read exactly.
#[test]
fn range_reads_of_records_with_different_geometries() {
    let server = RemoteServer::start(&[]);
    let mut s = store(&server, 12);
    let shapes = [(2u32, 512u32), (40, 512), (3, 2048), (40, 512), (1, 64)];
    for (i, &(layers, lb)) in shapes.iter().enumerate() {
        s.put(
            key(i as u64, 0),
            lb,
            &random_bytes(i as u64, (layers * lb) as usize),
        )
        .unwrap();
    }
    for _ in 0..2 {
        for (i, &(layers, lb)) in shapes.iter().enumerate() {
            let data = random_bytes(i as u64, (layers * lb) as usize);
            let mut out = vec![0; data.len()];
            s.get(key(i as u64, 0), &mut out).unwrap();
            assert!(out == data, "record {i}");
            let mut last = vec![0; lb as usize];
            s.get_layers(key(i as u64, 0), layers - 1, &mut last)
                .unwrap();
            assert!(
                last[..] == data[data.len() - lb as usize..],
                "record {i} last layer"
            );
        }
    }
    // First layer of a short record, then of a long one of the same layer size: the guess
    // (2 layers) fetches too short a header for the 40-layer record.
    for i in [0u64, 1, 4, 3, 0] {
        let (layers, lb) = shapes[i as usize];
        let data = random_bytes(i, (layers * lb) as usize);
        let mut first = vec![0; lb as usize];
        s.get_layers(key(i, 0), 0, &mut first).unwrap();
        assert!(first[..] == data[..lb as usize], "record {i} first layer");
    }
    assert_eq!(s.counters().checksum_failures, 0);
}

#[test]
fn killed_server_is_unavailable_quickly_then_service_resumes() {
    let mut server = RemoteServer::start(&[]);
    let mut s = store(&server, 5);
    let (k, lb) = (key(9, 0), 1024u32);
    let data = random_bytes(1, 64 * 1024);
    s.put(k, lb, &data).unwrap();

    server.kill();
    let t = Instant::now();
    let mut out = vec![0; data.len()];
    for i in 0..50u64 {
        let r = match i % 4 {
            0 => s.get(k, &mut out),
            1 => s.put(key(i, 0), lb, &data),
            2 => s.contains_many(&[k]).map(|_| ()),
            _ => s.remove(key(i, 1)),
        };
        assert!(
            matches!(r, Err(StoreError::Unavailable(_))),
            "call {i}: {r:?}"
        );
    }
    // Generous: a hang would be a deadline per call; fast failure is milliseconds.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(s.counters().unavailable, 50);
    assert!(!s.is_connected());

    server.restart(); // same port, empty (no persistence)
    assert_eq!(
        retry_until_up(&mut s, k, &mut out),
        Err(StoreError::Missing)
    );
    s.put(k, lb, &data).unwrap();
    s.get(k, &mut out).unwrap();
    assert_eq!(out, data);
}

#[test]
fn a_server_that_never_came_up_is_unavailable_not_an_error_at_open() {
    let port = support::free_port();
    let mut s = RemoteStore::open(remote_config(format!("redis://127.0.0.1:{port}"), 1)).unwrap();
    let mut out = vec![0; 16];
    assert!(matches!(
        s.get(key(1, 0), &mut out),
        Err(StoreError::Unavailable(_))
    ));
    assert!(RemoteStore::connect(remote_config(format!("redis://127.0.0.1:{port}"), 1)).is_err());
}

#[test]
fn password_and_acl_user() {
    let server = RemoteServer::start(&[
        "--requirepass",
        "s3cret",
        "--user",
        "kv",
        "on",
        ">kvpw",
        "~kvalloc-*",
        "+@all",
    ]);
    let data = random_bytes(3, 4096);
    let mut out = vec![0; data.len()];

    // requirepass, as a field and in the URL.
    let mut cfg = remote_config(server.url(), 1);
    cfg.password = Some("s3cret".into());
    let mut a = RemoteStore::connect(cfg).unwrap();
    a.put(key(1, 0), 1024, &data).unwrap();
    let mut b = RemoteStore::connect(remote_config(
        format!("redis://:s3cret@127.0.0.1:{}", server.port),
        1,
    ))
    .unwrap();
    b.get(key(1, 0), &mut out).unwrap();
    assert_eq!(out, data);

    // An ACL user limited to the keys of derived prefixes (kvalloc-<tag>).
    let mut cfg = remote_config(server.url(), 1);
    cfg.username = Some("kv".into());
    cfg.password = Some("kvpw".into());
    let mut c = RemoteStore::connect(cfg.clone()).unwrap();
    c.get(key(1, 0), &mut out).unwrap();
    assert_eq!(out, data);
    // ...which may not touch keys outside its prefix.
    let mut other_prefix = cfg.clone();
    other_prefix.key_prefix = Some("other".into());
    let mut d = RemoteStore::connect(other_prefix).unwrap();
    assert!(d.put(key(2, 0), 1024, &data).is_err());

    // Wrong or missing credentials: a clear error from connect, Unavailable from calls.
    for (user, pw) in [
        (None, Some("wrong")),
        (Some("kv"), Some("wrong")),
        (None, None),
    ] {
        let mut cfg = remote_config(server.url(), 1);
        cfg.username = user.map(str::to_string);
        cfg.password = pw.map(str::to_string);
        let err = RemoteStore::connect(cfg.clone()).unwrap_err().to_string();
        assert!(
            err.contains("authentication") || err.contains("NOAUTH"),
            "{err}"
        );
        assert!(!err.contains("wrong"), "the password leaks into {err}");
        let mut s = RemoteStore::open(cfg).unwrap();
        let r = s.get(key(1, 0), &mut out);
        assert!(
            matches!(r, Err(StoreError::Unavailable(ref m)) if m.contains("authentication")),
            "{r:?}"
        );
    }
}

#[test]
fn namespaces_are_isolated_and_instances_of_one_namespace_share() {
    let server = RemoteServer::start(&[]);
    let (mut a, mut b, mut a2) = (
        store(&server, 100),
        store(&server, 200),
        store(&server, 100),
    );
    let k = key(0x5eed, 1);
    let (da, db) = (random_bytes(1, 8192), random_bytes(2, 8192));
    a.put(k, 2048, &da).unwrap();
    assert_eq!(b.contains_many(&[k]).unwrap(), vec![false]);
    let mut out = vec![0; 8192];
    assert_eq!(b.get(k, &mut out), Err(StoreError::Missing));
    b.put(k, 2048, &db).unwrap();
    // Another instance in namespace 100 sees a's record, not b's.
    assert_eq!(a2.contains_many(&[k]).unwrap(), vec![true]);
    a2.get(k, &mut out).unwrap();
    assert_eq!(out, da);
    b.get(k, &mut out).unwrap();
    assert_eq!(out, db);
    // Another key prefix is another store too.
    let mut cfg = remote_config(server.url(), 100);
    cfg.key_prefix = Some("elsewhere".into());
    let mut c = RemoteStore::connect(cfg).unwrap();
    assert_eq!(c.contains_many(&[k]).unwrap(), vec![false]);
}

#[test]
fn server_out_of_memory_is_full_and_counted() {
    let server = RemoteServer::start(&["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"]);
    let mut s = store(&server, 1);
    let data = random_bytes(4, 1 << 20);
    let items: Vec<(BlockKey, u32, &[u8])> =
        (0..10u64).map(|i| (key(i, 0), 65536, &data[..])).collect();
    let results = s.put_many(&items);
    let full = results
        .iter()
        .filter(|r| matches!(r, Err(StoreError::Full(_))))
        .count();
    assert!(
        full > 0
            && results
                .iter()
                .all(|r| r.is_ok() || matches!(r, Err(StoreError::Full(_)))),
        "{results:?}"
    );
    assert_eq!(s.counters().writes_skipped_full, full as u64);
    // The connection is still good after a refused write.
    let mut out = vec![0; data.len()];
    s.get(key(0, 0), &mut out).unwrap();
    assert_eq!(out, data);
}

#[test]
fn damaged_or_foreign_values_are_corrupt_never_returned() {
    let server = RemoteServer::start(&[]);
    let mut s = store(&server, 1);
    let (k, lb) = (key(0xd00d, 0), 4096u32);
    let data = random_bytes(6, lb as usize * 6);
    s.put(k, lb, &data).unwrap();
    let rkey = s.key(k);
    let mut con = raw(&server);
    // Flip a byte in layer 4: layers 0..4 still read; the whole record is Corrupt.
    let header_len: usize = redis::cmd("STRLEN")
        .arg(&rkey)
        .query::<usize>(&mut con)
        .unwrap()
        - data.len();
    let off = header_len + 4 * lb as usize + 3;
    let _: () = redis::cmd("SETRANGE")
        .arg(&rkey)
        .arg(off)
        .arg(&[data[4 * lb as usize + 3] ^ 1][..])
        .query(&mut con)
        .unwrap();
    let mut head = vec![0; lb as usize * 4];
    s.get_layers(k, 0, &mut head).unwrap();
    assert_eq!(&head[..], &data[..head.len()]);
    let mut out = vec![0; data.len()];
    assert!(matches!(s.get(k, &mut out), Err(StoreError::Corrupt(_))));
    // A value that is not a record, and a record stored under another key.
    let _: () = redis::cmd("SET")
        .arg(&rkey)
        .arg("not a record")
        .query(&mut con)
        .unwrap();
    assert!(matches!(s.get(k, &mut out), Err(StoreError::Corrupt(_))));
    let other = key(0xbeef, 0);
    s.put(other, lb, &data).unwrap();
    let _: () = redis::cmd("COPY")
        .arg(s.key(other))
        .arg(&rkey)
        .arg("REPLACE")
        .query(&mut con)
        .unwrap();
    assert!(matches!(s.get(k, &mut out), Err(StoreError::Corrupt(_))));
    assert_eq!(s.counters().checksum_failures, 3);
    s.get(other, &mut out).unwrap();
    assert_eq!(out, data);
}
