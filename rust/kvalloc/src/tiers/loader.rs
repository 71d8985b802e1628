//! Layer-wise loading: background copies from host memory (L2) into the device buffer (L1),
//! ordered by the layer that needs them.
//!
//! A [`LoadJob`] is a list of per-layer copies (one layer's slice of one block each: the block
//! layout keeps each layer's slice contiguous). The loader thread runs jobs in submission order
//! and, inside a job, copies every sliding layer first (windows are small) and then the full
//! layers in layer order, marking each layer ready when its last copy lands. An engine waits
//! with [`LoadHandle::wait_layer`] just before it runs that layer, so the read of full layer
//! `k` overlaps the compute of the layers before it.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::device::{DeviceBuffer, HostMemory};
use crate::error::{Error, Result};

/// Bytes one load brings per layer and tier.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadBytes {
    /// `per_layer[layer][tier]`: bytes of that layer read from tier (host, disk, remote).
    pub per_layer: Vec<[u64; 3]>,
    /// Sliding-window layers (loaded first).
    pub sliding: Vec<bool>,
}

/// One copy: `len` bytes from host memory at `src` to the device at `dst`, for model layer
/// `layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyTask {
    /// Model layer the bytes belong to.
    pub layer: u32,
    /// Byte offset in host memory (L2).
    pub src: u64,
    /// Byte offset in the device buffer (L1).
    pub dst: u64,
    /// Bytes.
    pub len: u64,
}

#[derive(Debug)]
struct JobState {
    /// Copies still to land, per model layer.
    pending: Vec<u32>,
    remaining: usize,
}

/// A load in flight. Shared by the loader thread, the manager (which unpins the sources when it
/// is done) and the engine's handles.
#[derive(Debug)]
pub struct LoadJob {
    tasks: Vec<CopyTask>,
    state: Mutex<JobState>,
    ready: Condvar,
}

impl LoadJob {
    /// A job over `tasks` for a model of `num_layers` layers; `sliding[l]` says whether layer
    /// `l` slides (its copies go first).
    pub fn new(mut tasks: Vec<CopyTask>, num_layers: usize, sliding: &[bool]) -> Arc<LoadJob> {
        // Sliding layers first, then full layers, each in layer order; stable, so a layer's
        // copies keep their block order.
        tasks.sort_by_key(|t| (!sliding[t.layer as usize], t.layer));
        let mut pending = vec![0u32; num_layers];
        for t in &tasks {
            pending[t.layer as usize] += 1;
        }
        let remaining = tasks.len();
        Arc::new(LoadJob {
            tasks,
            state: Mutex::new(JobState { pending, remaining }),
            ready: Condvar::new(),
        })
    }

    /// Whether every copy landed.
    pub fn is_done(&self) -> bool {
        self.state.lock().expect("job lock").remaining == 0
    }

    /// Bytes the job copies.
    pub fn bytes(&self) -> u64 {
        self.tasks.iter().map(|t| t.len).sum()
    }

    fn run(&self, host: &HostMemory, device: &dyn DeviceBuffer) {
        for t in &self.tasks {
            // SAFETY: the source block is pinned in L2 until this job is done, so nothing
            // writes it meanwhile.
            let src = unsafe { host.slice(t.src, t.len as usize) };
            device.write(t.dst, src);
            let mut s = self.state.lock().expect("job lock");
            s.pending[t.layer as usize] -= 1;
            s.remaining -= 1;
            if s.pending[t.layer as usize] == 0 || s.remaining == 0 {
                self.ready.notify_all();
            }
        }
    }

    /// Waits until layer `layer`'s copies landed; false on timeout.
    pub fn wait_layer(&self, layer: usize, timeout: Option<Duration>) -> bool {
        self.wait_until(timeout, |s| s.pending.get(layer).is_none_or(|&p| p == 0))
    }

    /// Waits until every copy landed; false on timeout.
    pub fn wait_all(&self, timeout: Option<Duration>) -> bool {
        self.wait_until(timeout, |s| s.remaining == 0)
    }

    fn wait_until(&self, timeout: Option<Duration>, done: impl Fn(&JobState) -> bool) -> bool {
        let deadline = deadline(timeout);
        let mut s = self.state.lock().expect("job lock");
        while !done(&s) {
            match deadline {
                None => s = self.ready.wait(s).expect("job lock"),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    s = self.ready.wait_timeout(s, d - now).expect("job lock").0;
                }
            }
        }
        true
    }
}

/// The instant `timeout` from now; None (wait forever) without a timeout, or for one so long
/// that the clock cannot represent its end (centuries: forever in practice, never a panic).
fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.and_then(|t| Instant::now().checked_add(t))
}

/// What an engine waits on for one request: every load its hit depends on.
#[derive(Debug, Clone, Default)]
pub struct LoadHandle {
    jobs: Vec<Arc<LoadJob>>,
    /// Layers of the model: `wait_layer` refuses any other.
    num_layers: usize,
}

impl LoadHandle {
    /// A handle over `jobs` for a model of `num_layers` layers.
    pub fn new(jobs: Vec<Arc<LoadJob>>, num_layers: usize) -> Self {
        LoadHandle { jobs, num_layers }
    }

    /// Whether there is nothing to wait for.
    pub fn is_done(&self) -> bool {
        self.jobs.iter().all(|j| j.is_done())
    }

    /// Returns once layer `layer`'s KV is in L1 (true), or false on timeout (None: wait as
    /// long as it takes). A layer the model does not have is an [`Error::InvalidArgument`].
    pub fn wait_layer(&self, layer: usize, timeout: Option<Duration>) -> Result<bool> {
        if layer >= self.num_layers {
            return Err(Error::invalid(
                "layer",
                format!(
                    "{layer} is out of range: the model has {} layers",
                    self.num_layers
                ),
            ));
        }
        let deadline = deadline(timeout);
        Ok(self.jobs.iter().all(|j| {
            j.wait_layer(
                layer,
                deadline.map(|d| d.saturating_duration_since(Instant::now())),
            )
        }))
    }

    /// Returns once every layer is in L1 (true), or false on timeout (None: wait as long as it
    /// takes).
    pub fn wait_all(&self, timeout: Option<Duration>) -> bool {
        let deadline = deadline(timeout);
        self.jobs
            .iter()
            .all(|j| j.wait_all(deadline.map(|d| d.saturating_duration_since(Instant::now()))))
    }

    /// Bytes the loads copy.
    pub fn bytes(&self) -> u64 {
        self.jobs.iter().map(|j| j.bytes()).sum()
    }
}

/// The background thread that runs load jobs.
pub struct Loader {
    tx: Option<Sender<Arc<LoadJob>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Loader")
    }
}

impl Loader {
    /// Starts a loader copying from `host` into `device`.
    pub fn start(host: Arc<HostMemory>, device: Arc<dyn DeviceBuffer>) -> Loader {
        let (tx, rx) = channel::<Arc<LoadJob>>();
        let thread = std::thread::Builder::new()
            .name("kvalloc-loader".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job.run(&host, device.as_ref());
                }
            })
            .expect("spawn the loader thread");
        Loader {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// Queues a job.
    pub fn submit(&self, job: Arc<LoadJob>) {
        self.tx
            .as_ref()
            .expect("loader running")
            .send(job)
            .expect("loader thread alive");
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        drop(self.tx.take()); // ends the thread's loop once queued jobs ran
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiers::device::HostBuffer;

    #[test]
    fn copies_land_and_layers_become_ready_in_order() {
        let host = Arc::new(HostBuffer::zeroed(1024));
        let bytes: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        host.write(0, &bytes);
        let dev = Arc::new(HostBuffer::zeroed(1024));
        let loader = Loader::start(host, dev.clone());
        let tasks = vec![
            CopyTask {
                layer: 0,
                src: 0,
                dst: 512,
                len: 128,
            },
            CopyTask {
                layer: 1,
                src: 128,
                dst: 640,
                len: 128,
            },
            CopyTask {
                layer: 1,
                src: 256,
                dst: 768,
                len: 128,
            },
        ];
        let job = LoadJob::new(tasks, 2, &[false, true]);
        assert_eq!(job.tasks[0].layer, 1, "sliding layer first");
        loader.submit(job.clone());
        let h = LoadHandle::new(vec![job], 2);
        assert!(h.wait_layer(1, Some(Duration::from_secs(5))).unwrap());
        assert!(h.wait_all(Some(Duration::from_secs(5))));
        let mut out = vec![0u8; 384];
        dev.read(512, &mut out);
        assert_eq!(out, bytes[..384]);
    }

    #[test]
    fn a_layer_out_of_range_is_an_error_and_huge_timeouts_wait_forever() {
        // A job that never runs (no loader): a finite timeout expires, an unrepresentable one
        // would wait; a done handle answers any timeout at once, without panicking.
        let pending = LoadJob::new(
            vec![CopyTask {
                layer: 0,
                src: 0,
                dst: 0,
                len: 8,
            }],
            2,
            &[false, false],
        );
        let h = LoadHandle::new(vec![pending], 2);
        assert!(!h.wait_layer(0, Some(Duration::ZERO)).unwrap());
        assert!(
            h.wait_layer(1, Some(Duration::ZERO)).unwrap(),
            "no copy for layer 1"
        );
        assert!(!h.wait_all(Some(Duration::from_millis(1))));
        let done = LoadHandle::new(Vec::new(), 2);
        for t in [
            Duration::MAX,
            Duration::from_secs(u64::MAX / 2),
            Duration::ZERO,
        ] {
            assert!(done.wait_layer(1, Some(t)).unwrap());
            assert!(done.wait_all(Some(t)));
        }
        for layer in [2, 1_000_000, usize::MAX] {
            let e = done.wait_layer(layer, None).unwrap_err();
            assert!(
                matches!(e, Error::InvalidArgument { ref what, .. } if what == "layer"),
                "{e}"
            );
        }
        assert_eq!(deadline(Some(Duration::MAX)), None);
    }
}
