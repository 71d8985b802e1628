//! L3 disk store: round trips, corruption, restart recovery, disk full (issue #4).

mod support;

use std::fs;

use kvalloc::tiers::{BlockKey, BlockStore, DiskStore, StoreError};
use kvalloc::Error;
use support::{random_bytes, Rng, TempDir, Tmpfs};

fn key(hash: u64, group: u16) -> BlockKey {
    BlockKey { hash, group }
}

#[test]
fn random_records_round_trip_whole_and_by_layer_range() {
    let dir = TempDir::new("disk-rt");
    let mut s = DiskStore::open(dir.path(), 7).unwrap();
    let mut rng = Rng(0x1234_5678);
    let mut records = Vec::new();
    for i in 0..24u64 {
        let layers = 1 + rng.below(12) as u32;
        let lb = 16 * (1 + rng.below(600) as u32);
        let data = random_bytes(i, (layers * lb) as usize);
        let k = key(rng.below(u64::MAX) ^ (i << 56), (i % 3) as u16);
        s.put(k, lb, &data).unwrap();
        records.push((k, layers, lb, data));
    }
    for (k, layers, lb, data) in &records {
        let mut out = vec![0; data.len()];
        s.get(*k, &mut out).unwrap();
        assert_eq!(&out, data);
        let first = rng.below(u64::from(*layers)) as u32;
        let n = 1 + rng.below(u64::from(layers - first)) as u32;
        let (a, b) = ((first * lb) as usize, ((first + n) * lb) as usize);
        let mut part = vec![0; b - a];
        s.get_layers(*k, first, &mut part).unwrap();
        assert_eq!(&part[..], &data[a..b]);
        // A range past the record is refused, not truncated.
        let mut over = vec![0; (*lb * (layers - first + 1)) as usize];
        assert!(matches!(
            s.get_layers(*k, first, &mut over),
            Err(StoreError::Io(_))
        ));
    }
    let c = s.counters();
    assert_eq!(c.puts, 24);
    assert_eq!(c.gets, 48);
    assert_eq!(
        c.bytes_written,
        records.iter().map(|r| r.3.len() as u64).sum::<u64>()
    );
    assert_eq!(c.checksum_failures, 0);

    // Overwrite, contains, remove.
    let (k0, _, lb0, _) = records[0].clone();
    let new = random_bytes(99, lb0 as usize * 2);
    s.put(k0, lb0, &new).unwrap();
    let mut out = vec![0; new.len()];
    s.get(k0, &mut out).unwrap();
    assert_eq!(out, new);
    let absent = key(1, 0);
    assert_eq!(s.contains_many(&[k0, absent]).unwrap(), vec![true, false]);
    s.remove(k0).unwrap();
    s.remove(k0).unwrap(); // absent is fine
    assert_eq!(s.get(k0, &mut out), Err(StoreError::Missing));
    assert_eq!(s.contains_many(&[k0]).unwrap(), vec![false]);
    // A payload that is not whole layers is refused.
    assert!(s.put(absent, 10, &[0u8; 15]).is_err());
}

#[test]
fn corrupted_bytes_are_never_returned() {
    let dir = TempDir::new("disk-corrupt");
    let mut s = DiskStore::open(dir.path(), 1).unwrap();
    let (k, lb) = (key(0xabc, 1), 4096u32);
    let data = random_bytes(5, lb as usize * 8);
    s.put(k, lb, &data).unwrap();

    // Flip one bit in layer 5.
    let path = s.record_path(k);
    let mut bytes = fs::read(&path).unwrap();
    let header_len = bytes.len() - data.len();
    bytes[header_len + 5 * lb as usize + 17] ^= 0x10;
    fs::write(&path, &bytes).unwrap();

    // Layers before the damage still verify: layer-wise checksums.
    let mut head = vec![0; lb as usize * 5];
    s.get_layers(k, 0, &mut head).unwrap();
    assert_eq!(&head[..], &data[..head.len()]);
    // The damaged layer is Corrupt, counted, and the record is gone afterwards.
    let mut out = vec![0; data.len()];
    assert!(matches!(s.get(k, &mut out), Err(StoreError::Corrupt(m)) if m.contains("layer 5")));
    assert_eq!(s.counters().checksum_failures, 1);
    assert_eq!(s.get(k, &mut out), Err(StoreError::Missing));

    // A record copied under another key's name: its header names another record.
    let (a, b) = (key(0x1, 0), key(0x2, 0));
    s.put(a, lb, &data).unwrap();
    fs::copy(s.record_path(a), s.record_path(b)).unwrap();
    assert!(matches!(s.get(b, &mut out), Err(StoreError::Corrupt(_))));
    assert_eq!(s.counters().checksum_failures, 2);
    s.get(a, &mut out).unwrap();
    assert_eq!(out, data);
}

#[test]
fn restart_recovers_good_records_and_drops_torn_ones() {
    let dir = TempDir::new("disk-recover");
    let lb = 1000u32;
    let keys: Vec<BlockKey> = (0..7)
        .map(|i| key(0x1111_0000_0000_0000 * (i + 1), i as u16))
        .collect();
    let (truncated, bad_header, short, old) = (keys[1], keys[3], keys[4], keys[6]);
    let leftover;
    {
        let mut s = DiskStore::open(dir.path(), 42).unwrap();
        for (i, &k) in keys.iter().enumerate() {
            s.put(k, lb, &random_bytes(i as u64, lb as usize * (i + 1)))
                .unwrap();
        }
        // Torn: a record cut inside its payload, one with a damaged header, one cut inside
        // its header, and a temp file left by an interrupted write.
        let p = s.record_path(truncated);
        let len = fs::metadata(&p).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        let p = s.record_path(bad_header);
        let mut b = fs::read(&p).unwrap();
        b[0] = b'X';
        fs::write(&p, b).unwrap();
        fs::write(s.record_path(short), b"KVAB\x02\x00").unwrap();
        // A whole record of the previous format version (its version field says 1).
        let p = s.record_path(old);
        let mut b = fs::read(&p).unwrap();
        b[4] = 1;
        fs::write(&p, b).unwrap();
        leftover = s.record_path(keys[0]).with_file_name(".x-0.1.1.tmp");
        fs::write(&leftover, b"partial").unwrap();
        // A second store on the same namespace is refused while this one is open.
        let err = DiskStore::open(dir.path(), 42).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { ref what, .. } if what == "dir"),
            "{err}"
        );
    }
    let mut s = DiskStore::open(dir.path(), 42).unwrap();
    let good: Vec<(BlockKey, u64)> = [0usize, 2, 5]
        .iter()
        .map(|&i| (keys[i], u64::from(lb) * (i as u64 + 1)))
        .collect();
    let mut want = good.clone();
    want.sort();
    assert_eq!(s.recovered(), want);
    let st = s.recovery_stats();
    assert_eq!(
        (
            st.records,
            st.torn_removed,
            st.stale_removed,
            st.temp_removed
        ),
        (3, 3, 1, 1)
    );
    assert_eq!(st.payload_bytes, good.iter().map(|g| g.1).sum::<u64>());
    assert!(!leftover.exists());
    for k in [truncated, bad_header, short, old] {
        assert!(!s.record_path(k).exists());
    }
    for (i, &(k, bytes)) in good.iter().enumerate() {
        let mut out = vec![0; bytes as usize];
        s.get(k, &mut out).unwrap();
        assert_eq!(out, random_bytes([0u64, 2, 5][i], bytes as usize));
    }
    // Another namespace in the same directory sees none of it.
    let mut other = DiskStore::open(dir.path(), 43).unwrap();
    assert!(other.recovered().is_empty());
    assert_eq!(other.contains_many(&keys).unwrap(), vec![false; 7]);
}

#[test]
fn bad_directory_is_a_clear_error() {
    let dir = TempDir::new("disk-bad");
    let file = dir.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    let err = DiskStore::open(&file, 1).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { ref what, ref message } if what == "dir" && message.contains("plain-file")),
        "{err}"
    );
}

/// A real full filesystem: a 2 MiB tmpfs (mounting needs root, which this project's machines
/// and CI have). Writes past the end are skipped and counted, and leave no partial file.
#[test]
fn full_disk_skips_writes_and_leaves_nothing_behind() {
    let fs_ = Tmpfs::mount(2 << 20);
    let mut s = DiskStore::open(fs_.path(), 3).unwrap();
    let lb = 64 << 10;
    let data = random_bytes(8, lb * 5); // 320 KiB records
    let mut stored = Vec::new();
    let mut full = 0;
    for i in 0..12u64 {
        let k = key(i << 56 | i, 0);
        match s.put(k, lb as u32, &data) {
            Ok(()) => stored.push(k),
            Err(StoreError::Full(_)) => full += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(
        !stored.is_empty() && full > 0,
        "stored {} full {full}",
        stored.len()
    );
    assert_eq!(s.counters().writes_skipped_full, full);
    // Nothing but whole records (and the lock file) on the filesystem.
    let mut files = Vec::new();
    for shard in fs::read_dir(s.root()).unwrap() {
        let shard = shard.unwrap().path();
        if shard.is_dir() {
            for f in fs::read_dir(&shard).unwrap() {
                files.push(f.unwrap().file_name().to_string_lossy().into_owned());
            }
        }
    }
    assert_eq!(files.len(), stored.len(), "{files:?}");
    assert!(files.iter().all(|f| f.ends_with(".kvb")));
    // What was stored reads back; freeing space lets writes succeed again.
    let mut out = vec![0; data.len()];
    for &k in &stored {
        s.get(k, &mut out).unwrap();
        assert_eq!(out, data);
    }
    s.remove(stored[0]).unwrap();
    s.put(key(0xfeed, 1), lb as u32, &data).unwrap();
}

/// The namespace directory's shard for `k`, created (as a write would) by storing a record.
fn shard_of(s: &mut DiskStore, k: BlockKey) -> std::path::PathBuf {
    s.put(k, 16, &[1u8; 32]).unwrap();
    s.record_path(k).parent().unwrap().to_path_buf()
}

#[test]
fn empty_directory_is_refused() {
    let err = DiskStore::open("", 1).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { ref what, .. } if what == "dir"),
        "{err}"
    );
    assert!(
        !std::path::Path::new(&format!("{:016x}", 1)).exists(),
        "nothing is created in the working directory"
    );
}

/// A FIFO, a directory and a link named like records (and a directory named like a temp
/// file): start-up neither blocks on the FIFO nor fails on the directories; each is left
/// alone and counted, and reading one of those names is a counted integrity failure.
#[test]
fn entries_that_are_not_record_files_are_skipped_unopened() {
    let dir = TempDir::new("disk-not-files");
    let (good, fifo, sub, link) = (
        key(0xaa << 56, 0),
        key(0xaa << 56 | 1, 0),
        key(0xaa << 56 | 2, 0),
        key(0xaa << 56 | 3, 1),
    );
    let shard;
    let (fifo_path, sub_path, link_path);
    {
        let mut s = DiskStore::open(dir.path(), 5).unwrap();
        shard = shard_of(&mut s, good);
        fifo_path = s.record_path(fifo);
        sub_path = s.record_path(sub);
        link_path = s.record_path(link);
    }
    let c = std::ffi::CString::new(fifo_path.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a NUL-terminated path we own; no other memory is passed.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    fs::create_dir(&sub_path).unwrap();
    fs::create_dir(shard.join(".x-0.1.1.tmp")).unwrap();
    std::os::unix::fs::symlink(
        shard.join(format!("{:016x}-0.kvb", 0xaau64 << 56)),
        &link_path,
    )
    .unwrap();

    let mut s = DiskStore::open(dir.path(), 5).unwrap();
    let st = s.recovery_stats();
    assert_eq!(
        (st.records, st.not_files_skipped, st.torn_removed),
        (1, 4, 0)
    );
    assert_eq!(s.recovered(), vec![(good, 32)]);
    assert!(fifo_path.exists() && sub_path.is_dir() && link_path.exists());
    assert_eq!(
        s.contains_many(&[good, fifo, sub, link]).unwrap(),
        vec![true, false, false, false]
    );
    let mut out = [0u8; 32];
    for k in [fifo, sub, link] {
        assert!(
            matches!(s.get(k, &mut out), Err(StoreError::Corrupt(_))),
            "{k:?}"
        );
    }
    assert_eq!(s.counters().checksum_failures, 3);
    s.get(good, &mut out).unwrap();
    assert_eq!(out, [1u8; 32]);
}

#[test]
fn records_and_directories_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("disk-perms");
    let base = dir.path().join("cache"); // created by the store
    let mut s = DiskStore::open(&base, 6).unwrap();
    let k = key(0x42, 0);
    s.put(k, 16, &[3u8; 16]).unwrap();
    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let rec = s.record_path(k);
    assert_eq!(mode(&rec), 0o600);
    for d in [rec.parent().unwrap(), s.root(), &base] {
        assert_eq!(mode(d), 0o700, "{}", d.display());
    }
    assert_eq!(mode(&s.root().join(".lock")), 0o600);
}

/// A damaged header (here its layer count) is an integrity failure, like damaged payload, not
/// an I/O error: counted in `checksum_failures`.
#[test]
fn a_damaged_header_counts_as_a_checksum_failure() {
    let dir = TempDir::new("disk-header");
    let mut s = DiskStore::open(dir.path(), 8).unwrap();
    let (k, lb) = (key(0x77, 0), 64u32);
    let data = random_bytes(4, lb as usize * 4);
    s.put(k, lb, &data).unwrap();
    let path = s.record_path(k);
    let mut b = fs::read(&path).unwrap();
    b[24..28].copy_from_slice(&2u32.to_le_bytes()); // the layer count: 2 of the 4
    fs::write(&path, b).unwrap();
    let mut out = vec![0; data.len()];
    assert!(matches!(s.get(k, &mut out), Err(StoreError::Corrupt(_))));
    let c = s.counters();
    assert_eq!((c.checksum_failures, c.io_errors), (1, 0));
}
