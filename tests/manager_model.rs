use kvalloc::{Extension, KVCacheManager, ManagerConfig, ModelSpec, Policy, Prompt};
fn small_spec() -> ModelSpec {
    let cfg = serde_json::json!({
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "sliding_window": 128, "hybrid_layer_pattern": [0, 1, 1, 1],
    });
    ModelSpec::from_hf_config(&cfg, None).unwrap()
}
fn seq(start: i64, n: usize) -> Vec<i64> {
    (start..start + n as i64).collect()
}
fn mgr() -> KVCacheManager {
    KVCacheManager::new(small_spec(), 256 << 20, ManagerConfig::default()).unwrap()
}
#[test]
fn probe_doomed_collision() {
    let mut m = mgr();
    let p = seq(0, 200);
    let mut q = p.clone();
    q.extend(seq(5000, 50));
    m.admit(1, Prompt::Tokens(&p), None, None).unwrap().unwrap();
    m.admit(2, Prompt::Tokens(&q), None, None).unwrap().unwrap();
    m.abort(1).unwrap();
    m.validate().unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        m.admit(3, Prompt::Tokens(&p), None, None)
    }));
    println!("admit 3: {:?}", r.is_ok());
}
#[test]
fn probe_chunked_path() {
    let mut m = mgr();
    let a = seq(0, 1024);
    m.admit(1, Prompt::Tokens(&a), None, None).unwrap().unwrap();
    m.finish(1).unwrap();
    let mut early = a[..700].to_vec();
    early.extend(seq(60_000, 300));
    assert_eq!(
        m.admit(2, Prompt::Tokens(&early), None, Some(64)).unwrap(),
        Some(0)
    );
    println!("validate: {:?}", m.validate());
    while m.num_tokens(2).unwrap() < 1000 {
        let l = 1000 - m.num_tokens(2).unwrap();
        assert!(m.extend(2, Extension::Count(l.min(64))).unwrap());
    }
    m.validate().unwrap();
}
