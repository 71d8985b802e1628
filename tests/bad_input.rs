//! Absurd arguments through the core's public API: an error (or the documented meaning), never
//! a panic, an overflow or an abort, and the manager stays valid and usable.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::small_spec;
use kvalloc::tiers::{DeviceBuffer, HostBuffer, LowerCapacity};
use kvalloc::{Error, KVCacheManager, ManagerConfig, Prompt};

fn manager(host: u64) -> KVCacheManager {
    let cfg = ManagerConfig {
        lower: LowerCapacity {
            host,
            disk: 0,
            remote: 0,
        },
        ..ManagerConfig::default()
    };
    KVCacheManager::new(small_spec(), 1 << 20, cfg).unwrap()
}

#[test]
fn max_tokens_near_2_64_schedules_the_whole_prompt() {
    let mut m = manager(0);
    let prompt: Vec<i64> = (0..100).collect();
    assert_eq!(
        m.admit(1, Prompt::Tokens(&prompt), None, None).unwrap(),
        Some(0)
    );
    m.finish(1).unwrap();
    // The second admission hits 96 tokens; a limit near 2^64 on top of that used to overflow
    // (a panic in debug builds, a wrapped tiny limit in release ones).
    for (req, limit) in [(2, u64::MAX), (3, u64::MAX - 10), (4, 1 << 63)] {
        let hit = m
            .admit(req, Prompt::Tokens(&prompt), None, Some(limit))
            .unwrap();
        assert_eq!(hit, Some(96));
        assert_eq!(m.num_tokens(req).unwrap(), 100);
        m.abort(req).unwrap();
        m.validate().unwrap();
    }
}

#[test]
fn a_host_tier_the_system_cannot_give_is_an_error_at_register_device() {
    // More than any machine this runs on has available (and still numberable by the arena).
    let mut m = manager(1 << 41);
    let dev: Arc<dyn DeviceBuffer> = Arc::new(HostBuffer::zeroed(1 << 20));
    let e = m.register_device(dev.clone()).unwrap_err();
    assert!(
        matches!(e, Error::SystemMemory { ref what, .. } if what == "host_bytes"),
        "{e}"
    );
    m.validate().unwrap();
    // Nothing changed: the tiers stay virtual and the manager serves.
    assert!(!m.stats().tiers.iter().any(|t| t.real));
    let prompt: Vec<i64> = (0..40).collect();
    assert!(m
        .admit(1, Prompt::Tokens(&prompt), None, None)
        .unwrap()
        .is_some());
    m.validate().unwrap();
}

#[test]
fn load_handles_refuse_layers_the_model_lacks() {
    let mut m = manager(0);
    let prompt: Vec<i64> = (0..40).collect();
    m.admit(1, Prompt::Tokens(&prompt), None, None).unwrap();
    let h = m.load_handle(1).unwrap();
    assert!(h.wait_layer(3, Some(Duration::MAX)).unwrap());
    for layer in [4, 1_000_000, usize::MAX] {
        assert!(matches!(
            h.wait_layer(layer, None),
            Err(Error::InvalidArgument { .. })
        ));
    }
    assert!(h.wait_all(Some(Duration::MAX)));
}
