//! The remote store's transport against real servers on loopback (issue #21): TLS with a
//! private CA and client certificates, and a deadline on every call, so that a hung server
//! (SIGSTOP) or a killed one never holds a caller for long, never answers one command with
//! another's reply, and is not hammered while it is down.
//!
//! Wall times are bounded only as hang guards, many times the deadline; what is asserted is
//! the outcome and the counters.

mod support;

use std::time::{Duration, Instant};

use kvalloc::tiers::{BlockKey, BlockStore, RemoteConfig, RemoteStore, StoreError};
use kvalloc::Error;
use support::{random_bytes, remote_config, retry_until_up, RemoteServer};

fn key(hash: u64, group: u16) -> BlockKey {
    BlockKey { hash, group }
}

/// A hang guard: a call bounded by a deadline of at most 200 ms must return well within this.
const HANG: Duration = Duration::from_millis(1500);

/// Settings for a TLS server trusting its certificate file `ca`; a generous deadline, as these
/// tests are about TLS (debug builds beside other work on a small machine can take tens of ms
/// for a handshake).
fn tls_config(server: &RemoteServer, ca: &str) -> RemoteConfig {
    let mut cfg = RemoteConfig::new(server.url(), 21);
    cfg.tls_ca = Some(server.cert(ca));
    cfg.timeout = Duration::from_secs(2);
    cfg
}

/// Writes records of several sizes and reads them back whole and by layer ranges.
fn round_trip(s: &mut RemoteStore) {
    let records: Vec<(BlockKey, u32, Vec<u8>)> = (0..6u64)
        .map(|i| {
            (
                key(0x7150 + i, (i % 2) as u16),
                4096,
                random_bytes(i, 4096 * (1 + i as usize)),
            )
        })
        .collect();
    let items: Vec<(BlockKey, u32, &[u8])> =
        records.iter().map(|(k, lb, d)| (*k, *lb, &d[..])).collect();
    assert!(s.put_many(&items).iter().all(|r| r.is_ok()));
    for (k, lb, data) in &records {
        let mut out = vec![0; data.len()];
        s.get(*k, &mut out).unwrap();
        assert!(out == *data, "{k:?}");
        let mut last = vec![0; *lb as usize];
        let layers = (data.len() / *lb as usize) as u32;
        s.get_layers(*k, layers - 1, &mut last).unwrap();
        assert!(last[..] == data[data.len() - *lb as usize..]);
    }
    let keys: Vec<BlockKey> = records.iter().map(|r| r.0).collect();
    assert_eq!(s.contains_many(&keys).unwrap(), vec![true; keys.len()]);
}

#[test]
fn tls_round_trip_with_a_private_ca() {
    let server = RemoteServer::start_tls("no");
    assert!(server.url().starts_with("rediss://"));
    let mut s = RemoteStore::connect(tls_config(&server, "ca.crt")).unwrap();
    round_trip(&mut s);
    // A second instance over its own TLS connection reads what the first wrote.
    let mut t = RemoteStore::connect(tls_config(&server, "ca.crt")).unwrap();
    let mut out = vec![0; 4096];
    t.get(key(0x7150, 0), &mut out).unwrap();
    assert!(out == random_bytes(0, 4096));
    let c = s.counters();
    assert_eq!((c.unavailable, c.timeouts, c.checksum_failures), (0, 0, 0));
}

#[test]
fn tls_server_with_an_untrusted_certificate_is_refused_clearly() {
    let server = RemoteServer::start_tls("no");
    // A CA that did not sign the server's certificate, and the system's roots.
    let mut system_roots = tls_config(&server, "ca.crt");
    system_roots.tls_ca = None;
    for cfg in [tls_config(&server, "other-ca.crt"), system_roots] {
        let t = Instant::now();
        let err = RemoteStore::connect(cfg.clone()).unwrap_err().to_string();
        assert!(
            err.contains("TLS") && err.contains("certificate"),
            "not a clear TLS error: {err}"
        );
        let mut s = RemoteStore::open(cfg).unwrap();
        let mut out = vec![0; 16];
        let r = s.get(key(1, 0), &mut out);
        assert!(
            matches!(r, Err(StoreError::Unavailable(ref m)) if m.contains("TLS")),
            "{r:?}"
        );
        assert!(t.elapsed() < HANG, "{:?}", t.elapsed());
    }
    // A plain client at a TLS port: refused, not a hang and not garbage.
    let mut plain = RemoteStore::open(RemoteConfig::new(
        format!("redis://127.0.0.1:{}", server.port),
        21,
    ))
    .unwrap();
    let t = Instant::now();
    let mut out = vec![0; 16];
    assert!(matches!(
        plain.get(key(1, 0), &mut out),
        Err(StoreError::Unavailable(_))
    ));
    assert!(t.elapsed() < HANG, "{:?}", t.elapsed());
}

#[test]
fn mutual_tls_needs_the_client_certificate() {
    let server = RemoteServer::start_tls("yes");
    let err = RemoteStore::connect(tls_config(&server, "ca.crt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("TLS"), "{err}");
    let mut cfg = tls_config(&server, "ca.crt");
    cfg.tls_cert = Some(server.cert("client.crt"));
    cfg.tls_key = Some(server.cert("client.key"));
    let mut s = RemoteStore::connect(cfg).unwrap();
    round_trip(&mut s);
}

#[test]
fn tls_settings_are_checked_at_open() {
    let server = RemoteServer::start_tls("no");
    let what = |cfg: RemoteConfig| match RemoteStore::open(cfg).unwrap_err() {
        Error::InvalidArgument { what, message } => (what, message),
        e => panic!("{e}"),
    };
    // TLS files with a plain URL: the user would silently get no TLS.
    let mut cfg = tls_config(&server, "ca.crt");
    cfg.url = format!("redis://127.0.0.1:{}", server.port);
    assert_eq!(what(cfg).0, "tls_ca");
    let mut cfg = tls_config(&server, "no-such.crt");
    assert_eq!(what(cfg.clone()).0, "tls_ca");
    cfg.tls_ca = Some(server.cert("client.key")); // a key, not a certificate
    let (w, m) = what(cfg);
    assert_eq!(w, "tls_ca", "{m}");
    let mut cfg = tls_config(&server, "ca.crt");
    cfg.tls_cert = Some(server.cert("client.crt"));
    assert_eq!(what(cfg.clone()).0, "tls_key");
    cfg.tls_key = Some(server.cert("ca.crt")); // a certificate, not a key
    assert_eq!(what(cfg.clone()).0, "tls_key");
    cfg.tls_key = Some(server.cert("server.key")); // another certificate's key
    assert_eq!(what(cfg).0, "tls_key");
    let mut cfg = tls_config(&server, "ca.crt");
    cfg.url.push_str("/#insecure");
    assert_eq!(what(cfg).0, "url");
    let mut cfg = tls_config(&server, "ca.crt");
    cfg.timeout = Duration::ZERO;
    assert_eq!(what(cfg).0, "timeout");
}

/// Records written into a server (through a store with a generous deadline), and a store on
/// it with a short one, opened without a round trip: a busy machine cannot fail the set-up.
fn filled(server: &RemoteServer, timeout_ms: u64) -> (RemoteStore, Vec<(BlockKey, Vec<u8>)>) {
    let mut writer = RemoteStore::connect(remote_config(server.url(), 7)).unwrap();
    let records: Vec<(BlockKey, Vec<u8>)> = (0..8u64)
        .map(|i| (key(100 + i, 0), random_bytes(i, 16 * 1024)))
        .collect();
    for (k, d) in &records {
        writer.put(*k, 1024, d).unwrap();
    }
    let mut cfg = remote_config(server.url(), 7);
    cfg.timeout = Duration::from_millis(timeout_ms);
    cfg.max_reconnect_interval = Duration::from_millis(200);
    (RemoteStore::open(cfg).unwrap(), records)
}

/// A hung server (SIGSTOP): every kind of call fails as a counted timeout within its deadline
/// (a pipeline of many commands included: replies are not each given the whole deadline), the
/// calls during the back-off fail at once, and service resumes after SIGCONT.
#[test]
fn hung_server_calls_time_out_then_service_resumes() {
    let server = RemoteServer::start(&[]);
    let (mut s, records) = filled(&server, 100);
    let keys: Vec<BlockKey> = (0..64).map(|i| key(i, 0)).collect();
    let data = random_bytes(99, 4096);
    server.signal(libc::SIGSTOP);
    let mut out = vec![0; records[0].1.len()];
    for call in 0..5 {
        let t = Instant::now();
        let r = match call {
            0 => s.contains_many(&keys).map(|_| ()),
            1 => s.get(records[0].0, &mut out),
            2 => s.get_layers(records[1].0, 3, &mut out[..1024]),
            3 => s.put(key(999, 0), 1024, &data),
            _ => s.remove(records[2].0),
        };
        assert!(t.elapsed() < HANG, "call {call}: {:?}", t.elapsed());
        assert!(
            matches!(r, Err(StoreError::Unavailable(_))),
            "call {call}: {r:?}"
        );
        // Past the back-off, so that each call makes its own attempt.
        std::thread::sleep(s.config().max_reconnect_interval);
    }
    let c = s.counters();
    assert_eq!((c.timeouts, c.unavailable), (5, 5), "{c:?}");
    assert!(!s.is_connected());
    server.signal(libc::SIGCONT);
    assert_eq!(retry_until_up(&mut s, records[0].0, &mut out), Ok(()));
    assert!(out == records[0].1);
}

/// After a timeout the connection is dropped: the hung server's late reply to one read can
/// never be taken as the answer to the next (another key's bytes).
#[test]
fn a_late_reply_never_answers_the_next_command() {
    let server = RemoteServer::start(&[]);
    for range_reads in [false, true] {
        let (s, records) = filled(&server, 100);
        let mut cfg = s.config().clone();
        cfg.range_reads = range_reads;
        cfg.reconnect_interval = Duration::from_millis(1);
        let mut s = RemoteStore::open(cfg).unwrap();
        let mut out = vec![0; records[0].1.len()];
        // Connected, and the geometry learned.
        assert_eq!(retry_until_up(&mut s, records[0].0, &mut out), Ok(()));
        let before = s.counters().timeouts;
        server.signal(libc::SIGSTOP);
        let r = s.get(records[1].0, &mut out);
        server.signal(libc::SIGCONT);
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        std::thread::sleep(Duration::from_millis(50)); // the late reply is sent
        for (k, data) in records.iter().skip(2) {
            assert_eq!(retry_until_up(&mut s, *k, &mut out), Ok(()));
            assert!(out == *data, "{k:?} read another record's bytes");
        }
        assert_eq!(s.counters().checksum_failures, 0);
        assert!(s.counters().timeouts > before);
    }
}

/// A hung server still accepts connections; the back-off must still grow with each timed-out
/// attempt (it ends with a reply, not with a connect), so calls mostly fail at once.
#[test]
fn hung_server_is_not_hammered() {
    let server = RemoteServer::start(&[]);
    let mut cfg = RemoteConfig::new(server.url(), 3);
    cfg.timeout = Duration::from_millis(20);
    cfg.reconnect_interval = Duration::from_millis(50);
    cfg.max_reconnect_interval = Duration::from_millis(400);
    let mut s = RemoteStore::open(cfg).unwrap();
    server.signal(libc::SIGSTOP);
    let mut out = vec![0; 64];
    let t = Instant::now();
    let mut calls = 0u64;
    while t.elapsed() < Duration::from_millis(1500) {
        assert!(s.get(key(calls, 0), &mut out).is_err());
        calls += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    server.signal(libc::SIGCONT);
    let c = s.counters();
    // Attempts at about 0, 70, 190, 410, 830 and 1250 ms: 6 (fewer on a slow machine). With
    // the back-off reset by each connect, one every 70 ms: about 20.
    assert!(c.timeouts <= 8, "{} attempts in 1.5 s: {c:?}", c.timeouts);
    assert_eq!(c.unavailable, calls);
}

/// A server killed mid-run (SIGKILL) and restarted empty: misses and failed writes, never an
/// error other than `Unavailable` or stale bytes, and service after the restart.
#[test]
fn killed_server_then_restarted() {
    let mut server = RemoteServer::start(&[]);
    let (mut s, records) = filled(&server, 100);
    server.kill();
    let mut out = vec![0; records[0].1.len()];
    for (k, d) in &records {
        let t = Instant::now();
        assert!(matches!(
            s.get(*k, &mut out),
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            s.put(*k, 1024, d),
            Err(StoreError::Unavailable(_))
        ));
        assert!(t.elapsed() < HANG);
    }
    server.restart();
    assert_eq!(
        retry_until_up(&mut s, records[0].0, &mut out),
        Err(StoreError::Missing)
    );
    s.put(records[0].0, 1024, &records[0].1).unwrap();
    s.get(records[0].0, &mut out).unwrap();
    assert!(out == records[0].1);
}

/// The store sends `AUTH` and `SELECT` itself (under its deadline): records land in the URL's
/// database, and a database the server does not have is a clear refusal.
#[test]
fn password_and_database_from_the_url() {
    let server = RemoteServer::start(&["--requirepass", "pw"]);
    let url = |db: u32| format!("redis://:pw@127.0.0.1:{}/{db}", server.port);
    let mut s = RemoteStore::connect(remote_config(url(3), 9)).unwrap();
    let data = random_bytes(5, 4096);
    s.put(key(1, 0), 1024, &data).unwrap();
    let mut out = vec![0; data.len()];
    s.get(key(1, 0), &mut out).unwrap();
    assert!(out == data);
    let mut other_db = RemoteStore::connect(remote_config(url(0), 9)).unwrap();
    assert_eq!(other_db.contains_many(&[key(1, 0)]).unwrap(), vec![false]);
    let err = RemoteStore::connect(remote_config(url(999), 9))
        .unwrap_err()
        .to_string();
    assert!(err.contains("SELECT refused"), "{err}");
    assert!(!err.contains("pw@"), "the password leaks into {err}");
}
