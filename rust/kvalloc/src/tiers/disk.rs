//! L3: a [`BlockStore`] of one file per record under a directory the user gives.
//!
//! # On-disk layout
//!
//! ```text
//! <dir>/<namespace:016x>/.lock                     advisory lock: one DiskStore per namespace
//! <dir>/<namespace:016x>/<hh>/<id:016x>-<group>.kvb  one record: RecordHeader, then payload
//! <dir>/<namespace:016x>/<hh>/.<id:016x>-<group>.<pid>.<seq>.tmp   a write in progress
//! ```
//!
//! `id` is the record id ([`RecordKeys::record_id`]: a keyed one-way function of the block's
//! chained hash, so a file name reveals no chain). `hh` is its top byte in hex: 256
//! sub-directories keep directories small when millions of blocks are cached. A record file is
//! exactly the encoded [`RecordHeader`] (magic, version, key, geometry, layer tags, header tag)
//! followed by the payload, layer-major, so layer `i` lives at `header_len + i * layer_bytes`.
//! Directories are created owner-only (0700), record files 0600: cached KV is tenant data.
//!
//! # Invariants
//!
//! - A `.kvb` file only ever appears whole: a write goes to a temp file in the same directory
//!   and is renamed into place. A reader never sees a half-written record under its final name
//!   (a crash can still leave a record whose unsynced pages are lost; see *Durability*).
//! - Bytes are returned only after the header's tag and their layer's tag matched. A mismatch
//!   (damage anywhere in the record, a file copied or forged under another name, another
//!   secret, an older format) returns [`StoreError::Corrupt`], counts `checksum_failures`, and
//!   removes the record, so the next lookup is a clean miss. On any error the content of the
//!   caller's buffer is unspecified.
//! - Only regular files are opened, never following a link and never blocking (`O_NOFOLLOW`,
//!   `O_NONBLOCK`): a FIFO, a directory or a link named like a record is not one.
//! - One `DiskStore` owns a namespace directory at a time (an exclusive `flock` on `.lock`),
//!   which is what makes deleting leftover temp files on open safe.
//! - Disk full (`ENOSPC`, `EDQUOT`) returns [`StoreError::Full`], counts
//!   `writes_skipped_full`, and leaves nothing behind (the temp file is removed).
//!
//! # Durability
//!
//! This is a cache: by default nothing is fsynced. A crash (of the machine, not the process)
//! loses at most the records written shortly before it. Recovery on the next open drops records
//! whose size or header is wrong; one whose length survived but whose data did not fails its
//! checksum on first read and is dropped then. [`DiskOptions::fsync`] syncs each record and its
//! directory before the write returns, for setups that want records to survive power loss.
//!
//! # Restart recovery
//!
//! [`DiskStore::open`] scans the namespace directory: each regular `.kvb` file whose name parses,
//! whose header decodes and checks under the store's keys and names the same key and
//! namespace, and whose length is exactly header + payload is listed by
//! [`BlockStore::recovered`]. Other `.kvb` files (torn, foreign, another secret's, an older
//! format's) and every leftover `.tmp` file are removed and counted in [`RecoveryStats`];
//! entries with such names that are not regular files are left alone, unopened, and counted.
//! Payload tags are not read at open (that would read the whole cache); they are checked on
//! every read.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::keys::RecordKeys;
use super::store::{
    BlockKey, BlockStore, RecordHeader, StoreCounters, StoreError, HEADER_FIXED_BYTES,
    LAYERS_OFFSET, RECORD_MAGIC, RECORD_VERSION,
};
use crate::error::Error;

/// Options of a [`DiskStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskOptions {
    /// fsync each record file and its directory before `put` returns (default off: it is a
    /// cache, and recovery detects what a crash tore).
    pub fsync: bool,
}

/// What [`DiskStore::open`] found while recovering its index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryStats {
    /// Valid records listed by `recovered()`.
    pub records: u64,
    /// Their payload bytes.
    pub payload_bytes: u64,
    /// Record files removed because they were short, long, or had a bad header (damaged,
    /// forged, or written under another secret).
    pub torn_removed: u64,
    /// Record files of an older format version removed (never served).
    pub stale_removed: u64,
    /// Leftover temp files (writes interrupted by a crash) removed.
    pub temp_removed: u64,
    /// Entries named like a record or temp file that are not regular files (FIFOs,
    /// directories, links): left alone, never opened.
    pub not_files_skipped: u64,
}

/// Why recovery does not list a record file.
enum Unusable {
    /// An older format version.
    Stale,
    /// Anything else wrong with it.
    Torn,
}

/// Bytes read and verified per positioned read: whole layers up to about this much, so each
/// chunk is checksummed while it is still in the CPU cache.
const READ_CHUNK_BYTES: usize = 256 << 10;

/// Bytes of the first header read: the fixed part plus tags of up to 506 layers, so one
/// `pread` fetches the whole header of any real model.
const HEADER_PROBE_BYTES: usize = 4096;

/// Local-disk store: one file per record. See the module docs for layout and invariants.
#[derive(Debug)]
pub struct DiskStore {
    /// `<dir>/<namespace:016x>`.
    root: PathBuf,
    keys: RecordKeys,
    opts: DiskOptions,
    /// Holds the exclusive lock on `<root>/.lock` for the store's life.
    _lock: File,
    counters: StoreCounters,
    recovery: RecoveryStats,
    recovered: Vec<(BlockKey, u64)>,
    /// Makes temp names unique within this process.
    tmp_seq: u64,
    /// Reused buffers: the encoded header of a write, the header probe of a read.
    header_buf: Vec<u8>,
    probe_buf: Vec<u8>,
}

impl DiskStore {
    /// Opens (creating if needed) the store for `namespace` under `dir` with default options
    /// and no secret, and recovers its index. Errors name the path at fault: `dir` empty, not
    /// creatable or not writable, or the namespace already open in another `DiskStore`.
    pub fn open(dir: impl AsRef<Path>, namespace: u64) -> Result<DiskStore, Error> {
        Self::open_with(dir, namespace, DiskOptions::default())
    }

    /// [`open`](Self::open) with options.
    pub fn open_with(
        dir: impl AsRef<Path>,
        namespace: u64,
        opts: DiskOptions,
    ) -> Result<DiskStore, Error> {
        Self::open_keyed(dir, RecordKeys::new(namespace, None), opts)
    }

    /// [`open`](Self::open) for the records of `keys` (its namespace and secret), with options.
    pub fn open_keyed(
        dir: impl AsRef<Path>,
        keys: RecordKeys,
        opts: DiskOptions,
    ) -> Result<DiskStore, Error> {
        if dir.as_ref().as_os_str().is_empty() {
            // "" would mean the working directory, wherever the process happens to run.
            return Err(Error::invalid(
                "dir",
                "the disk directory is empty; give a path",
            ));
        }
        let root = dir.as_ref().join(format!("{:016x}", keys.namespace()));
        let shown = root.display().to_string();
        let bad_dir = move |what: &str, e: io::Error| Error::InvalidArgument {
            what: "dir".into(),
            message: format!("{what} {shown}: {e}"),
        };
        create_dirs(&root).map_err(|e| bad_dir("cannot create", e))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(root.join(".lock"))
            .map_err(|e| bad_dir("cannot open the lock file in", e))?;
        if let Err(e) = lock_exclusive(&lock) {
            return Err(bad_dir(
                "another DiskStore holds the namespace directory",
                e,
            ));
        }
        let mut store = DiskStore {
            root,
            keys,
            opts,
            _lock: lock,
            counters: StoreCounters::default(),
            recovery: RecoveryStats::default(),
            recovered: Vec::new(),
            tmp_seq: 0,
            header_buf: Vec::new(),
            probe_buf: vec![0; HEADER_PROBE_BYTES],
        };
        store.recover().map_err(|e| bad_dir("cannot scan", e))?;
        Ok(store)
    }

    /// The namespace directory (`<dir>/<namespace:016x>`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// What recovery found when the store was opened.
    pub fn recovery_stats(&self) -> RecoveryStats {
        self.recovery
    }

    /// The path of `key`'s record file.
    pub fn record_path(&self, key: BlockKey) -> PathBuf {
        self.shard_dir(key.hash)
            .join(format!("{:016x}-{}.kvb", key.hash, key.group))
    }

    fn shard_dir(&self, hash: u64) -> PathBuf {
        self.root.join(format!("{:02x}", hash >> 56))
    }

    /// Scans the namespace directory: lists valid records, removes torn ones and temp files.
    fn recover(&mut self) -> io::Result<()> {
        for shard in fs::read_dir(&self.root)? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(shard.path())? {
                let entry = entry?;
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let key = parse_record_name(&name);
                let temp = name.ends_with(".tmp");
                if key.is_none() && !temp {
                    continue; // not ours: left alone
                }
                // The entry's own type (links not followed): opening a FIFO would block, a
                // directory cannot be removed as a file.
                if !entry.file_type()?.is_file() {
                    self.recovery.not_files_skipped += 1;
                    continue;
                }
                let Some(key) = key else {
                    remove_if_present(&path)?;
                    self.recovery.temp_removed += 1;
                    continue;
                };
                match self.check_record(&path, key) {
                    Ok(payload) => {
                        self.recovered.push((key, payload));
                        self.recovery.records += 1;
                        self.recovery.payload_bytes += payload;
                    }
                    Err(why) => {
                        remove_if_present(&path)?;
                        match why {
                            Unusable::Stale => self.recovery.stale_removed += 1,
                            Unusable::Torn => self.recovery.torn_removed += 1,
                        }
                    }
                }
            }
        }
        self.recovered.sort_unstable();
        Ok(())
    }

    /// Structural check of one record file (its header's tag included); returns its payload
    /// size.
    fn check_record(&mut self, path: &Path, key: BlockKey) -> Result<u64, Unusable> {
        let file = open_record(path).map_err(|_| Unusable::Torn)?;
        let len = file.metadata().map_err(|_| Unusable::Torn)?.len();
        let header = self.read_header(&file, key).map_err(|_| {
            match RecordHeader::version_of(&self.probe_buf) {
                Some(v) if v != RECORD_VERSION => Unusable::Stale,
                _ => Unusable::Torn,
            }
        })?;
        if len != header.encoded_len() as u64 + header.payload_bytes() {
            return Err(Unusable::Torn);
        }
        Ok(header.payload_bytes())
    }

    /// Reads, decodes and checks the header of an open record file.
    fn read_header(&mut self, file: &File, key: BlockKey) -> Result<RecordHeader, StoreError> {
        let n = read_up_to(file, &mut self.probe_buf, 0).map_err(io_err)?;
        let header = match RecordHeader::decode(&self.probe_buf[..n], &self.keys) {
            Ok(h) => h,
            // A header longer than the probe (over 506 layers): read exactly its length.
            Err(_) if n == HEADER_PROBE_BYTES && self.probe_buf[..4] == RECORD_MAGIC => {
                let at = LAYERS_OFFSET;
                let layers = u32::from_le_bytes(self.probe_buf[at..at + 4].try_into().expect("4"));
                let layers = (layers as usize).min(1 << 16); // decode rejects more
                let mut buf = vec![0; HEADER_FIXED_BYTES + 8 * layers];
                let n = read_up_to(file, &mut buf, 0).map_err(io_err)?;
                RecordHeader::decode(&buf[..n], &self.keys)?
            }
            Err(e) => return Err(e),
        };
        header.check(self.keys.namespace(), key)?;
        Ok(header)
    }

    /// Writes one record through a temp file; the error is already classified.
    fn write_record(
        &mut self,
        key: BlockKey,
        layer_bytes: u32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        if layer_bytes == 0 || data.is_empty() || !data.len().is_multiple_of(layer_bytes as usize) {
            return Err(StoreError::Io(format!(
                "payload of {} bytes is not a whole, non-zero number of {layer_bytes}-byte layers",
                data.len()
            )));
        }
        let header = RecordHeader::for_payload(&self.keys, key, layer_bytes, data);
        self.header_buf.clear();
        header.encode(&mut self.header_buf);

        let dir = self.shard_dir(key.hash);
        self.tmp_seq += 1;
        let tmp = dir.join(format!(
            ".{:016x}-{}.{}.{}.tmp",
            key.hash,
            key.group,
            std::process::id(),
            self.tmp_seq
        ));
        let mut file = match create_new(&tmp) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_dirs(&dir).map_err(classify_write)?;
                create_new(&tmp).map_err(classify_write)?
            }
            other => other.map_err(classify_write)?,
        };
        let written = write_all_vectored(
            &mut file,
            &mut [IoSlice::new(&self.header_buf), IoSlice::new(data)],
        )
        .and_then(|()| {
            if self.opts.fsync {
                file.sync_data()
            } else {
                Ok(())
            }
        })
        .and_then(|()| fs::rename(&tmp, self.record_path(key)))
        .and_then(|()| {
            if self.opts.fsync {
                File::open(&dir)?.sync_all()
            } else {
                Ok(())
            }
        });
        drop(file);
        if let Err(e) = written {
            // Never leave a partial record behind (it would cost space until the next open).
            let _ = fs::remove_file(&tmp);
            return Err(classify_write(e));
        }
        Ok(())
    }

    /// Reads and verifies layers into `dst`; the error is already classified.
    fn read_layers(
        &mut self,
        key: BlockKey,
        first_layer: u32,
        dst: &mut [u8],
    ) -> Result<(), StoreError> {
        let file = match open_record(&self.record_path(key)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::Missing),
            // A link, a FIFO or a directory where a record should be: not a record.
            Err(e) if is_not_a_file(&e) => return Err(StoreError::Corrupt(e.to_string())),
            Err(e) => return Err(io_err(e)),
        };
        let header = self.read_header(&file, key)?;
        header.check_range(first_layer, dst.len())?;
        let lb = header.layer_bytes as usize;
        let layers_per_chunk = (READ_CHUNK_BYTES / lb).max(1);
        let mut offset = (header.encoded_len() + first_layer as usize * lb) as u64;
        let mut layer = first_layer;
        for chunk in dst.chunks_mut(layers_per_chunk * lb) {
            file.read_exact_at(chunk, offset)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => StoreError::Corrupt("record truncated".into()),
                    _ => io_err(e),
                })?;
            header.verify_layers(&self.keys, layer, chunk)?;
            offset += chunk.len() as u64;
            layer += (chunk.len() / lb) as u32;
        }
        Ok(())
    }

    fn count_error(&mut self, e: &StoreError) {
        match e {
            StoreError::Corrupt(_) => self.counters.checksum_failures += 1,
            StoreError::Full(_) => self.counters.writes_skipped_full += 1,
            StoreError::Unavailable(_) => self.counters.unavailable += 1,
            StoreError::Io(_) => self.counters.io_errors += 1,
            StoreError::Missing => {}
        }
    }
}

impl BlockStore for DiskStore {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn put(&mut self, key: BlockKey, layer_bytes: u32, data: &[u8]) -> Result<(), StoreError> {
        match self.write_record(key, layer_bytes, data) {
            Ok(()) => {
                self.counters.puts += 1;
                self.counters.bytes_written += data.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.count_error(&e);
                Err(e)
            }
        }
    }

    fn get_layers(
        &mut self,
        key: BlockKey,
        first_layer: u32,
        dst: &mut [u8],
    ) -> Result<(), StoreError> {
        match self.read_layers(key, first_layer, dst) {
            Ok(()) => {
                self.counters.gets += 1;
                self.counters.bytes_read += dst.len() as u64;
                Ok(())
            }
            Err(e) => {
                if matches!(e, StoreError::Corrupt(_)) {
                    // A corrupt record never serves again; the caller counts a miss.
                    let _ = fs::remove_file(self.record_path(key));
                }
                self.count_error(&e);
                Err(e)
            }
        }
    }

    fn contains_many(&mut self, keys: &[BlockKey]) -> Result<Vec<bool>, StoreError> {
        keys.iter()
            .map(|&k| match fs::symlink_metadata(self.record_path(k)) {
                Ok(m) => Ok(m.is_file()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => {
                    self.counters.io_errors += 1;
                    Err(io_err(e))
                }
            })
            .collect()
    }

    fn remove(&mut self, key: BlockKey) -> Result<(), StoreError> {
        remove_if_present(&self.record_path(key)).map_err(|e| {
            self.counters.io_errors += 1;
            io_err(e)
        })
    }

    fn recovered(&mut self) -> Vec<(BlockKey, u64)> {
        self.recovered.clone()
    }

    fn reader(&self) -> Option<Box<dyn BlockStore>> {
        // The same directory and keys; the lock's file handle is shared (the lock stays held
        // while either lives). No recovery scan: the reader only reads.
        let lock = self._lock.try_clone().ok()?;
        Some(Box::new(DiskStore {
            root: self.root.clone(),
            keys: self.keys.clone(),
            opts: self.opts,
            _lock: lock,
            counters: StoreCounters::default(),
            recovery: RecoveryStats::default(),
            recovered: Vec::new(),
            tmp_seq: 0,
            header_buf: Vec::new(),
            probe_buf: vec![0; HEADER_PROBE_BYTES],
        }))
    }

    fn counters(&self) -> StoreCounters {
        self.counters
    }

    fn keys(&self) -> &RecordKeys {
        &self.keys
    }
}

/// Takes the exclusive lock on an open lock file. A lock that a store just dropped can still be
/// held for a moment by a process forked meanwhile (its copy of the descriptor lives until it
/// execs), so a busy lock is retried for up to 200 ms before the directory counts as taken.
fn lock_exclusive(lock: &File) -> io::Result<()> {
    for attempt in 0.. {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || attempt == 20 {
            return Err(e);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    unreachable!("the loop returns")
}

/// Creates `dir` and its missing parents owner-only (0700; existing ones are left as they are).
fn create_dirs(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Opens a record for reading: a regular file only, never through a link (`O_NOFOLLOW`) and
/// never blocking (`O_NONBLOCK`: a FIFO's open would wait for a writer).
fn open_record(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(NOT_A_FILE, "not a regular file"));
    }
    Ok(file)
}

/// The error kind [`open_record`] gives a non-regular file.
const NOT_A_FILE: io::ErrorKind = io::ErrorKind::InvalidInput;

/// Whether an [`open_record`] error means "something else than a record file is there": a link
/// (`ELOOP` under `O_NOFOLLOW`), a socket (`ENXIO`), or another non-regular file.
fn is_not_a_file(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENXIO)) || e.kind() == NOT_A_FILE
}

/// Parses `<hash:016x>-<group>.kvb`.
fn parse_record_name(name: &str) -> Option<BlockKey> {
    let stem = name.strip_suffix(".kvb")?;
    let (hash, group) = stem.split_once('-')?;
    if hash.len() != 16 {
        return None;
    }
    Some(BlockKey {
        hash: u64::from_str_radix(hash, 16).ok()?,
        group: group.parse().ok()?,
    })
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `pread` until `buf` is full or the file ends; returns the bytes read.
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Writes every byte of `bufs` with as few `writev` calls as the kernel allows.
fn write_all_vectored(file: &mut File, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match file.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A write error: out of space or quota is `Full`, anything else `Io`.
fn classify_write(e: io::Error) -> StoreError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::Full(e.to_string()),
        _ => io_err(e),
    }
}

fn io_err(e: io::Error) -> StoreError {
    StoreError::Io(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_round_trip() {
        let k = BlockKey {
            hash: 0xdead_beef_0000_0001,
            group: 3,
        };
        assert_eq!(parse_record_name("deadbeef00000001-3.kvb"), Some(k));
        assert_eq!(parse_record_name("deadbeef00000001-3.kvb.tmp"), None);
        assert_eq!(parse_record_name("beef-3.kvb"), None);
        assert_eq!(parse_record_name("deadbeef00000001-x.kvb"), None);
    }
}
