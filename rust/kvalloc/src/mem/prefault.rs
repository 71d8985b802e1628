//! Committing bookkeeping memory ahead of use.
//!
//! A page's first touch is a page fault, microseconds each in a virtual machine
//! (`benches/step.py page-faults`). A cache that grows its node and slab arrays page by page pays
//! that on its hot path, about twice per scheduler step in `benches/step.py loop`.
//! A serving engine sets its memory up once, at start (vLLM 0.33's `BlockPool` builds a
//! `KVCacheBlock` for each of its `num_gpu_blocks` in its constructor:
//! `vllm/v1/core/block_pool.py`, installed by `benches/peers/setup_venv.sh`), and so does
//! kvalloc, within a budget ([`ManagerConfig::prefault_bytes`](crate::ManagerConfig::prefault_bytes)).
//!
//! The tree's hash index is left to grow: sized for the budget up front, it spreads a young
//! cache's entries over megabytes of buckets, and the first steps of `benches/step.py prefault`
//! ran slower than with nothing committed.

use crate::error::{Error, Result};

/// Makes room for `additional` more elements in `v` and touches that memory, leaving `v`'s
/// contents and length unchanged: its growth over those elements allocates and faults nothing.
/// An allocation the system refuses is an error naming `prefault_bytes`, never an abort.
pub(crate) fn commit<T: Clone>(v: &mut Vec<T>, additional: usize, fill: T) -> Result<()> {
    let len = v.len();
    v.try_reserve_exact(additional).map_err(|e| {
        Error::invalid(
            "prefault_bytes",
            format!(
                "cannot commit {} bytes of bookkeeping memory ({e}); give a smaller budget",
                additional.saturating_mul(std::mem::size_of::<T>())
            ),
        )
    })?;
    crate::mem::hugepage::advise(v); // before the first touch, which is what backs the pages
    v.resize(len + additional, fill);
    v.truncate(len);
    Ok(())
}

/// This machine's physical memory in bytes, where the platform says.
pub(crate) fn physical_memory() -> Option<u64> {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads system configuration.
        let (pages, page) = unsafe {
            (
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        if pages > 0 && page > 0 {
            return Some(pages as u64 * page as u64);
        }
    }
    None
}

/// Memory this process can still get without swapping or being killed, where the system
/// says: the kernel's estimate of available memory (`MemAvailable`), within the cgroup's
/// limit if one is set; else the physical memory.
pub(crate) fn available_memory() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
        let available = meminfo.as_deref().and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
        let read = |f: &str| -> Option<u64> {
            std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        // cgroup v2: "max" (no limit) does not parse.
        let cgroup =
            read("memory.max").map(|max| max.saturating_sub(read("memory.current").unwrap_or(0)));
        if let Some(a) = match (available, cgroup) {
            (Some(a), Some(c)) => Some(a.min(c)),
            (a, c) => a.or(c),
        } {
            return Some(a);
        }
    }
    physical_memory()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_keeps_contents_and_makes_room() {
        let mut v = vec![1u32, 2, 3];
        commit(&mut v, 1000, 7).unwrap();
        assert_eq!(v, [1, 2, 3]);
        assert!(v.capacity() >= 1003);
        let p = v.as_ptr();
        v.extend(std::iter::repeat_n(9, 1000));
        assert_eq!(p, v.as_ptr(), "the growth reallocated");
    }

    #[test]
    fn an_impossible_commitment_is_an_error_not_an_abort() {
        let mut v = vec![0u64; 4];
        let e = commit(&mut v, usize::MAX / 4, 0).unwrap_err();
        assert!(e.to_string().contains("prefault_bytes"), "{e}");
        assert_eq!(v, [0; 4]);
    }
}
