//! Background reads from disk and the remote store into the device buffer, verified before the
//! manager publishes them.
//!
//! A read from a slow disk or a busy (or frozen) store must not stall the scheduler's step, so
//! promotions from those tiers run here: one thread per store, each with its own handle
//! ([`BlockStore::reader`]: its own files or connection), working through [`FetchJob`]s in
//! submission order. Inside a job the records of sliding-window groups come first (windows are
//! small), then the full-attention groups', block by block, as the host loader orders its
//! copies. Each record is read whole and checked (its header and every layer's tag) before its
//! bytes are written to the device: a record that fails is never written.
//!
//! **Cancellation and the device pages.** The manager gives up on a job past its deadline and
//! then frees the pages the job had not filled. The fetcher writes a record's bytes to the
//! device under the job's lock, after checking the job was not cancelled; [`FetchJob::cancel`]
//! takes the same lock. So once `cancel` returns no write of that job can land any more, and
//! its pages may go to another request. (The read itself runs without the lock: a frozen
//! server holds the fetcher thread, never the manager.)

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::device::DeviceBuffer;
use super::store::{BlockKey, BlockStore, StoreCounters};

/// One record to read: `key`'s bytes (`len`, the record's payload) into the device at `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchTask {
    /// The record.
    pub key: BlockKey,
    /// Byte offset in the device buffer (the page allocated for it).
    pub dst: u64,
    /// Payload bytes.
    pub len: u64,
}

/// What became of one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchStatus {
    /// Not read yet.
    Pending,
    /// Read, verified and written to the device.
    Verified,
    /// The read failed (missing, corrupt, unavailable, past the store's deadline): nothing
    /// was written.
    Failed,
    /// The job was cancelled before this record was read: nothing was written.
    Cancelled,
}

#[derive(Debug)]
struct FetchState {
    status: Vec<FetchStatus>,
    remaining: usize,
    cancelled: bool,
    /// When the fetcher started and finished the job (its bandwidth measure).
    started: Option<Instant>,
    finished: Option<Instant>,
    verified_bytes: u64,
}

/// A batch of record reads for one promotion from one tier.
#[derive(Debug)]
pub struct FetchJob {
    tasks: Vec<FetchTask>,
    state: Mutex<FetchState>,
    done: Condvar,
}

impl FetchJob {
    /// A job over `tasks`, read in the given order (the manager orders them).
    pub fn new(tasks: Vec<FetchTask>) -> Arc<FetchJob> {
        let n = tasks.len();
        Arc::new(FetchJob {
            tasks,
            state: Mutex::new(FetchState {
                status: vec![FetchStatus::Pending; n],
                remaining: n,
                cancelled: false,
                started: None,
                finished: None,
                verified_bytes: 0,
            }),
            done: Condvar::new(),
        })
    }

    /// The tasks, in reading order.
    pub fn tasks(&self) -> &[FetchTask] {
        &self.tasks
    }

    /// Whether every task is verified or failed.
    pub fn is_done(&self) -> bool {
        self.lock().remaining == 0
    }

    /// Stops the job: tasks not read yet are cancelled, and no write of this job lands after this
    /// returns (see the module docs).
    pub fn cancel(&self) {
        let mut s = self.lock();
        s.cancelled = true;
        let mut failed = 0;
        for st in s.status.iter_mut() {
            if *st == FetchStatus::Pending {
                *st = FetchStatus::Cancelled;
                failed += 1;
            }
        }
        s.remaining -= failed;
        if s.finished.is_none() {
            s.finished = Some(Instant::now());
        }
        self.done.notify_all();
    }

    /// Each task's status, in task order.
    pub fn statuses(&self) -> Vec<FetchStatus> {
        self.lock().status.clone()
    }

    /// Verified bytes and the seconds the fetcher spent on the job (None until it finished
    /// one it started): the tier's measured bandwidth.
    pub fn throughput(&self) -> Option<(u64, f64)> {
        let s = self.lock();
        match (s.started, s.finished) {
            (Some(a), Some(b)) if s.verified_bytes > 0 => {
                Some((s.verified_bytes, (b - a).as_secs_f64()))
            }
            _ => None,
        }
    }

    /// Waits until the job is done; false on timeout.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut s = self.lock();
        while s.remaining > 0 {
            match deadline {
                None => s = self.done.wait(s).expect("fetch lock"),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    s = self.done.wait_timeout(s, d - now).expect("fetch lock").0;
                }
            }
        }
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FetchState> {
        self.state.lock().expect("fetch lock")
    }

    /// Reads every task through `store` into `device` (the fetcher thread), publishing the
    /// store's counters to `counters` after each read.
    fn run(
        &self,
        store: &mut dyn BlockStore,
        device: &dyn DeviceBuffer,
        buf: &mut Vec<u8>,
        counters: &Mutex<StoreCounters>,
    ) {
        {
            let mut s = self.lock();
            if s.cancelled {
                return;
            }
            s.started = Some(Instant::now());
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if self.lock().cancelled {
                return;
            }
            buf.resize(t.len as usize, 0);
            let ok = store.get(t.key, buf).is_ok();
            *counters.lock().expect("counters lock") = store.counters();
            let mut s = self.lock();
            if s.cancelled {
                return; // `cancel` failed this task already
            }
            if ok {
                // Under the lock: a cancel either came before (and nothing lands) or waits for
                // this copy to finish.
                device.write(t.dst, buf);
                s.verified_bytes += t.len;
                s.status[i] = FetchStatus::Verified;
            } else {
                s.status[i] = FetchStatus::Failed;
            }
            s.remaining -= 1;
            if s.remaining == 0 {
                s.finished = Some(Instant::now());
                self.done.notify_all();
            }
        }
    }
}

/// One store's background reader thread.
pub struct Fetcher {
    tx: Option<Sender<Arc<FetchJob>>>,
    thread: Option<JoinHandle<()>>,
    /// The reader handle's counters (its reads count in the tier's store statistics).
    counters: Arc<Mutex<StoreCounters>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fetcher")
    }
}

impl Fetcher {
    /// Starts a thread reading through `store` (a reader handle of the tier's store) into
    /// `device`.
    pub fn start(
        name: &str,
        mut store: Box<dyn BlockStore>,
        device: Arc<dyn DeviceBuffer>,
    ) -> Fetcher {
        let (tx, rx) = channel::<Arc<FetchJob>>();
        let counters = Arc::new(Mutex::new(store.counters()));
        let shared = counters.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kvalloc-fetch-{name}"))
            .spawn(move || {
                let mut buf = Vec::new();
                while let Ok(job) = rx.recv() {
                    job.run(store.as_mut(), device.as_ref(), &mut buf, &shared);
                }
            })
            .expect("spawn a fetcher thread");
        Fetcher {
            tx: Some(tx),
            thread: Some(thread),
            counters,
        }
    }

    /// The reader handle's counters.
    pub fn counters(&self) -> StoreCounters {
        *self.counters.lock().expect("counters lock")
    }

    /// Queues a job.
    pub fn submit(&self, job: Arc<FetchJob>) {
        self.tx
            .as_ref()
            .expect("fetcher running")
            .send(job)
            .expect("fetcher thread alive");
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
