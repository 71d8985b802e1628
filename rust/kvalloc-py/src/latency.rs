//! The Python manager's `exposed_load_seconds`: the core manager reports what its promotions
//! load (bytes per layer and tier); this prices them with the simulator's overlap model at its
//! default bandwidths and prefill speed, after each call that can promote.

use std::sync::Mutex;

use kvalloc::sim::OverlapModel;
use kvalloc::KVCacheManager;

/// Exposed load seconds of every promotion so far.
#[derive(Default)]
pub(crate) struct ExposedLoad(Mutex<f64>);

impl ExposedLoad {
    /// Adds the exposed seconds of `m`'s last call's promotions (called with `m` still locked,
    /// right after the call).
    #[inline]
    pub fn add(&self, m: &KVCacheManager) {
        if m.promotions().is_empty() {
            return;
        }
        let model = OverlapModel::default();
        if let Ok(mut total) = self.0.lock() {
            for p in m.promotions() {
                *total += model.promotion_seconds(p);
            }
        }
    }

    /// The total so far.
    pub fn seconds(&self) -> f64 {
        self.0.lock().map_or(0.0, |t| *t)
    }
}
