//! Tenant and model isolation through the disk and remote tiers, with real bytes (issue #21):
//! an attacker who reads another tenant's keys and inverts the chain step gets no hit; a record
//! copied under another key, or written under another secret, is rejected and counted; two
//! models of one geometry never share a record. Every manager is a fresh one over the same
//! directory or server (a restart), every served block's bytes are compared with what its
//! writer wrote, and every probe checks the device buffer for the victim's bytes.

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{content, small_spec, B};
use kvalloc::hash::{chain_ids, chain_tokens, id_block, root_seed};
use kvalloc::tiers::{
    namespace, DeviceBuffer, HostBuffer, LowerCapacity, RecordHeader, RecordKeys, RemoteSetup,
    Secret, StoreSetup,
};
use kvalloc::{KVCacheManager, ManagerConfig, ModelSpec, Prompt, NULL_PAGE};
use support::{RemoteServer, TempDir};

const L1: u64 = 96 << 10;

/// Held while a server process starts and while a disk store opens: a child between fork and
/// exec holds a copy of every descriptor, the previous instance's directory lock included, and
/// the next instance's open would find the directory locked.
static FORKS: Mutex<()> = Mutex::new(());

fn start_server() -> RemoteServer {
    let _g = FORKS.lock().unwrap_or_else(|e| e.into_inner());
    RemoteServer::start(&[])
}
const VICTIM_SALT: &[u8] = b"victim: a salt nobody else knows";

/// Where an instance keeps its lower tiers.
#[derive(Clone, Copy)]
enum Where<'a> {
    Disk(&'a Path),
    Remote(&'a RemoteServer),
}

struct Instance {
    m: KVCacheManager,
    dev: Arc<HostBuffer>,
    bb: Vec<u64>,
}

fn instance_with(spec: ModelSpec, at: Where<'_>, setup: StoreSetup) -> Instance {
    let mut setup = setup;
    let mut lower = LowerCapacity::default();
    match at {
        Where::Disk(dir) => {
            setup.disk_dir = Some(dir.to_path_buf());
            lower.disk = 64 << 20;
        }
        Where::Remote(server) => {
            setup.remote = Some(RemoteSetup {
                url: server.url(),
                ..RemoteSetup::default()
            });
            lower.remote = 64 << 20;
        }
    }
    let cfg = ManagerConfig {
        lower,
        ..ManagerConfig::default()
    };
    let bb = spec.block_bytes(B as u32);
    let opened = {
        let _g = FORKS.lock().unwrap_or_else(|e| e.into_inner());
        KVCacheManager::with_setup(spec, L1, cfg, setup)
    };
    let mut m = opened.unwrap();
    let dev = Arc::new(HostBuffer::zeroed(L1 as usize));
    m.register_device(dev.clone() as Arc<dyn DeviceBuffer>)
        .unwrap();
    Instance { m, dev, bb }
}

fn instance(spec: ModelSpec, at: Where<'_>) -> Instance {
    instance_with(spec, at, StoreSetup::default())
}

/// Store settings with a deployment secret.
fn with_secret(secret: &[u8]) -> StoreSetup {
    StoreSetup {
        secret: Secret::new(secret),
        ..StoreSetup::default()
    }
}

impl Instance {
    fn page(&self, g: usize, page: i32) -> Vec<u8> {
        let mut out = vec![0u8; self.bb[g] as usize];
        self.dev.read(page as u64 * self.bb[g], &mut out);
        out
    }

    /// Admits `prompt` under `salt` and waits for its loads; the hit in tokens.
    fn admit(&mut self, id: u64, prompt: Prompt<'_>, salt: Option<&[u8]>) -> u64 {
        let hit = self
            .m
            .admit_waiting(id, prompt, salt, None, None)
            .unwrap()
            .expect("fits");
        assert!(self
            .m
            .load_handle(id)
            .unwrap()
            .wait_all(Some(Duration::from_secs(10))));
        hit
    }

    /// Serves a token prompt: checks that every block of the hit holds the bytes its writer
    /// wrote (a function of the block's chain under `salt`), writes the rest, finishes.
    fn serve(&mut self, id: u64, tokens: &[i64], salt: Option<&[u8]>) -> u64 {
        let hit = self.admit(id, Prompt::Tokens(tokens), salt);
        let chain = chain_of(tokens, salt);
        for g in 0..self.bb.len() {
            for (i, &page) in self.m.block_table(id, g).unwrap().iter().enumerate() {
                let Some(&h) = chain.get(i).filter(|_| page != NULL_PAGE) else {
                    continue;
                };
                let want = content(h, g, self.bb[g] as usize);
                if i < hit as usize / B {
                    assert!(
                        self.page(g, page) == want,
                        "block {i} group {g}: wrong bytes"
                    );
                } else {
                    self.dev.write(page as u64 * self.bb[g], &want);
                }
            }
        }
        self.m.finish(id).unwrap();
        self.m.validate().unwrap();
        hit
    }

    /// Whether any page of request `id` holds one of `blocks`.
    fn holds_any(&self, id: u64, blocks: &[Vec<u8>]) -> bool {
        (0..self.bb.len()).any(|g| {
            self.m
                .block_table(id, g)
                .unwrap()
                .iter()
                .filter(|&&p| p != NULL_PAGE)
                .any(|&p| {
                    let got = self.page(g, p);
                    blocks.contains(&got)
                })
        })
    }
}

fn chain_of(tokens: &[i64], salt: Option<&[u8]>) -> Vec<u64> {
    let mut chain = Vec::new();
    chain_tokens(root_seed(salt), tokens, B, &mut chain);
    chain
}

/// The victim's conversation: 10 whole blocks.
fn victim_prompt() -> Vec<i64> {
    common::prompt_of(1, 3, 0)
}

/// The hit the victim's next turn gets when all of its prompt is cached: its whole blocks.
fn resume() -> u64 {
    (victim_prompt().len() / B * B) as u64
}

/// Every block (every group) the victim wrote.
fn victim_blocks(bb: &[u64]) -> Vec<Vec<u8>> {
    let chain = chain_of(&victim_prompt(), Some(VICTIM_SALT));
    let mut out = Vec::new();
    for &h in &chain {
        for (g, &b) in bb.iter().enumerate() {
            out.push(content(h, g, b as usize));
        }
    }
    out
}

/// The victim serves its conversation and shuts down cleanly (everything written below L1).
fn victim_writes(spec: ModelSpec, at: Where<'_>, setup: StoreSetup) {
    let mut v = instance_with(spec, at, setup);
    assert_eq!(v.serve(1, &victim_prompt(), Some(VICTIM_SALT)), 0);
    v.m.flush();
}

// ------------------------------------------------------------------------------------------
// What an attacker sees: the keys of the stores, and the values behind them
// ------------------------------------------------------------------------------------------

/// One stored record as an outsider sees it: the hash its key names, its group, its value.
struct Seen {
    hash: u64,
    group: u16,
    value: Vec<u8>,
    /// The file (disk) or server key (remote) it lives under.
    name: String,
}

fn record_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(record_files(&p));
        } else if p.extension().is_some_and(|x| x == "kvb") {
            out.push(p);
        }
    }
    out
}

fn seen_records(at: Where<'_>) -> Vec<Seen> {
    match at {
        Where::Disk(dir) => record_files(dir)
            .into_iter()
            .map(|p| {
                let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
                let (hash, group) = stem.split_once('-').unwrap();
                Seen {
                    hash: u64::from_str_radix(hash, 16).unwrap(),
                    group: group.parse().unwrap(),
                    value: std::fs::read(&p).unwrap(),
                    name: p.to_str().unwrap().into(),
                }
            })
            .collect(),
        Where::Remote(server) => {
            let mut c = raw(server);
            let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut c).unwrap();
            keys.into_iter()
                .map(|k| {
                    let parts: Vec<&str> = k.rsplitn(3, ':').collect(); // group, hash, rest
                    let value: Vec<u8> = redis::cmd("GET").arg(&k).query(&mut c).unwrap();
                    Seen {
                        hash: u64::from_str_radix(parts[1], 16).unwrap(),
                        group: parts[0].parse().unwrap(),
                        value,
                        name: k,
                    }
                })
                .collect()
        }
    }
}

fn raw(server: &RemoteServer) -> redis::Connection {
    redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Overwrites a record's stored value, as an outsider with write access would.
fn overwrite(at: Where<'_>, name: &str, value: &[u8]) {
    match at {
        Where::Disk(_) => std::fs::write(name, value).unwrap(),
        Where::Remote(server) => {
            let () = redis::cmd("SET")
                .arg(name)
                .arg(value)
                .query(&mut raw(server))
                .unwrap();
        }
    }
}

/// For each block of the victim's prompt, the stored record of its group 0 (found by its
/// payload, which is the value's tail).
fn victim_records(at: Where<'_>, bb: &[u64]) -> Vec<Seen> {
    let chain = chain_of(&victim_prompt(), Some(VICTIM_SALT));
    let mut seen = seen_records(at);
    chain
        .iter()
        .enumerate()
        .map(|(i, &h)| {
            let want = content(h, 0, bb[0] as usize);
            let k = seen
                .iter()
                .position(|s| s.group == 0 && s.value.ends_with(&want))
                .unwrap_or_else(|| panic!("block {i} of the victim is stored"));
            seen.swap_remove(k)
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Inverting the chain step
// ------------------------------------------------------------------------------------------

/// The 8-byte block id whose chaining step from `prev` gives `target`: `id_block` is xxh3-64 of
/// 8 bytes, a bijection (xor with a seed-derived constant, then an invertible avalanche).
fn invert_id_block(prev: u64, target: u64) -> u64 {
    const M: u64 = 0x9FB2_1C65_1E98_DF25;
    let mut m_inv = M; // Newton's iteration for M^-1 mod 2^64
    for _ in 0..6 {
        m_inv = m_inv.wrapping_mul(2u64.wrapping_sub(M.wrapping_mul(m_inv)));
    }
    let mut v = target;
    v ^= v >> 28;
    v ^= v >> 56;
    v = v.wrapping_mul(m_inv);
    v ^= (v >> 35).wrapping_add(8);
    v = v.wrapping_mul(m_inv);
    // v ^ rotl(v, 49) ^ rotl(v, 24) is multiplication by p = 1 + x^49 + x^24 modulo x^64 + 1;
    // p^64 = 1, so its inverse is p^63 = p * p^2 * p^4 * ... * p^32.
    for k in 0..6 {
        let (a, b) = ((49u32 << k) % 64, (24u32 << k) % 64);
        v ^= v.rotate_left(a) ^ v.rotate_left(b); // a rotation by 0 is v: right for x^0 terms
    }
    // xxh3's 4-to-8-byte path with the default secret.
    let mut seed = prev ^ 0x1d5;
    seed ^= u64::from((seed as u32).swap_bytes()) << 32;
    let s8 = u64::from_le_bytes([0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c]);
    let s16 = u64::from_le_bytes([0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb]);
    let input64 = v ^ (s8 ^ s16).wrapping_sub(seed);
    let mut id = [0u8; 8];
    id[..4].copy_from_slice(&((input64 >> 32) as u32).to_le_bytes());
    id[4..].copy_from_slice(&(input64 as u32).to_le_bytes());
    let id = u64::from_le_bytes(id);
    assert_eq!(id_block(prev, id), target, "the inversion is exact");
    id
}

/// Block ids whose chain under `salt` is exactly `targets`.
fn forge_ids(salt: Option<&[u8]>, targets: &[u64]) -> Vec<u64> {
    let mut prev = root_seed(salt);
    let ids: Vec<u64> = targets
        .iter()
        .map(|&t| {
            let id = invert_id_block(prev, t);
            prev = t;
            id
        })
        .collect();
    let mut chain = Vec::new();
    chain_ids(root_seed(salt), &ids, &mut chain);
    assert_eq!(chain, targets);
    ids
}

// ------------------------------------------------------------------------------------------
// Cross-tenant reads
// ------------------------------------------------------------------------------------------

/// The victim (a secret salt) writes; after a restart, an attacker reads the victim's keys,
/// builds `BlockHashes` prompts whose chain lands on them under its own salt (and none), and
/// gets no hit and none of the victim's bytes. The victim itself still hits after the restart.
fn cross_tenant_probe(at: Where<'_>, setup: StoreSetup) {
    victim_writes(small_spec(), at, setup.clone());
    let mut a = instance_with(small_spec(), at, setup.clone());
    let blocks = victim_blocks(&a.bb);
    let seen: Vec<u64> = victim_records(at, &a.bb).iter().map(|s| s.hash).collect();
    let num_tokens = (seen.len() * B + 1) as u64;
    for (id, salt) in [(10, Some(&b"mallory"[..])), (11, None)] {
        let ids = forge_ids(salt, &seen);
        let prompt = Prompt::BlockHashes {
            hashes: &ids,
            num_tokens,
        };
        let tiers = a.m.match_prefix_tiers(prompt, salt).unwrap();
        assert_eq!(tiers, [0; 4], "the attacker's prompt matches nothing");
        let hit = a.admit(id, prompt, salt);
        assert_eq!(hit, 0, "the attacker is served the victim's prefix");
        assert!(
            !a.holds_any(id, &blocks),
            "the victim's bytes reach the attacker"
        );
        a.m.abort(id).unwrap();
        a.m.validate().unwrap();
    }
    drop(a);
    // The victim, restarted, is served its own prefix from below L1, bytes checked.
    let mut v = instance_with(small_spec(), at, setup);
    let mut next = victim_prompt();
    next.extend([7, 7, 7]);
    assert_eq!(v.serve(20, &next, Some(VICTIM_SALT)), resume());
}

#[test]
fn an_inverted_chain_reaches_no_other_tenant_on_disk() {
    let dir = TempDir::new("iso-tenant-disk");
    cross_tenant_probe(Where::Disk(dir.path()), StoreSetup::default());
    let dir = TempDir::new("iso-tenant-disk-secret");
    cross_tenant_probe(Where::Disk(dir.path()), with_secret(b"deployment secret"));
}

#[test]
fn an_inverted_chain_reaches_no_other_tenant_on_the_remote_store() {
    let server = start_server();
    cross_tenant_probe(Where::Remote(&server), StoreSetup::default());
    let server = start_server();
    cross_tenant_probe(Where::Remote(&server), with_secret(b"deployment secret"));
}

// ------------------------------------------------------------------------------------------
// Substituted records
// ------------------------------------------------------------------------------------------

/// Each of the victim's stored values from block 3 on is replaced by block 2's value, its
/// header edited to name the record it replaces (key and group fields), while the restarted
/// victim runs. The victim is served blocks 0..3 at most, never a substituted block, and the
/// rejection is counted.
fn substitution_probe(at: Where<'_>) {
    victim_writes(small_spec(), at, StoreSetup::default());
    let mut v = instance(small_spec(), at);
    let recs = victim_records(at, &v.bb);
    for r in &recs[3..] {
        let mut forged = recs[2].value.clone();
        forged[6..8].copy_from_slice(&r.group.to_le_bytes());
        forged[16..24].copy_from_slice(&r.hash.to_le_bytes());
        overwrite(at, &r.name, &forged);
    }
    let mut next = victim_prompt();
    next.extend([7, 7, 7]);
    let hit = v.serve(1, &next, Some(VICTIM_SALT)); // bytes checked inside
    assert!(
        hit <= 3 * B as u64,
        "hit {hit}: a substituted block was served"
    );
    let st = v.m.stats();
    let store = st.tiers.iter().find_map(|t| t.store).unwrap();
    assert!(store.checksum_failures > 0, "{store:?}");
}

#[test]
fn a_record_copied_under_another_key_is_rejected_on_disk() {
    let dir = TempDir::new("iso-subst-disk");
    substitution_probe(Where::Disk(dir.path()));
}

#[test]
fn a_record_copied_under_another_key_is_rejected_on_the_remote_store() {
    let server = start_server();
    substitution_probe(Where::Remote(&server));
}

// ------------------------------------------------------------------------------------------
// Models of one geometry
// ------------------------------------------------------------------------------------------

/// `small_spec`'s geometry under another name (as `save_pretrained` writes it).
fn named_spec(name: &str) -> ModelSpec {
    let cfg = serde_json::json!({
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "sliding_window": 32, "hybrid_layer_pattern": [0, 1, 1, 1],
        "_name_or_path": name,
    });
    ModelSpec::from_hf_config(&cfg, None).unwrap()
}

/// A base model and a fine-tune of the same geometry: the fine-tune, restarted on the base's
/// directory or server, finds none of the base's records; the base finds all of them.
fn models_probe(at: Where<'_>) {
    let (base, tuned) = (named_spec("org/base"), named_spec("org/base-tuned"));
    assert_eq!(base.fingerprint(), tuned.fingerprint());
    victim_writes(base.clone(), at, StoreSetup::default());
    let mut next = victim_prompt();
    next.extend([7, 7, 7]);
    {
        let mut t = instance(tuned, at);
        let blocks = victim_blocks(&t.bb);
        assert_eq!(
            t.m.match_prefix_tiers(Prompt::Tokens(&next), Some(VICTIM_SALT))
                .unwrap(),
            [0; 4]
        );
        let hit = t.admit(1, Prompt::Tokens(&next), Some(VICTIM_SALT));
        assert_eq!(hit, 0, "the fine-tune is served the base model's KV");
        assert!(!t.holds_any(1, &blocks));
        t.m.abort(1).unwrap();
    }
    let mut b = instance(base, at);
    assert_eq!(b.serve(2, &next, Some(VICTIM_SALT)), resume());
}

#[test]
fn models_of_one_geometry_never_share_disk_records() {
    let dir = TempDir::new("iso-models-disk");
    models_probe(Where::Disk(dir.path()));
}

#[test]
fn models_of_one_geometry_never_share_remote_records() {
    let server = start_server();
    models_probe(Where::Remote(&server));
}

// ------------------------------------------------------------------------------------------
// Records written under another secret
// ------------------------------------------------------------------------------------------

/// A deployment with a secret writes; a writer with another secret, or none, re-writes the
/// deployment's records from block 3 on (valid records under its own keys: block 2's payload,
/// the victim's visible keys) while the restarted deployment runs. Not one is served; each
/// rejection is counted. A deployment with the forger's secret then shares nothing with it
/// (on disk it finds records it cannot check, and removes them).
fn forged_secret_probe(at: Where<'_>, forger: Option<&[u8]>) {
    let setup = with_secret(b"deployment secret");
    victim_writes(small_spec(), at, setup.clone());
    let spec = small_spec();
    let mut next = victim_prompt();
    next.extend([7, 7, 7]);
    let mut v = instance_with(spec.clone(), at, setup);
    let keys = RecordKeys::new(
        namespace(&spec, B as u32),
        forger.and_then(Secret::new).as_ref(),
    );
    let recs = victim_records(at, &v.bb);
    let chain = chain_of(&victim_prompt(), Some(VICTIM_SALT));
    for r in seen_records(at) {
        if !recs[3..].iter().any(|x| x.hash == r.hash) {
            continue;
        }
        let g = r.group as usize;
        let lb = spec.groups[g].layer_bytes_per_token() as u32 * B as u32;
        let payload = content(chain[2], g, v.bb[g] as usize);
        let key = kvalloc::tiers::BlockKey {
            hash: r.hash,
            group: r.group,
        };
        let mut value = Vec::new();
        RecordHeader::for_payload(&keys, key, lb, &payload).encode(&mut value);
        value.extend_from_slice(&payload);
        overwrite(at, &r.name, &value);
    }
    let hit = v.serve(2, &next, Some(VICTIM_SALT)); // bytes checked inside
    assert!(hit <= 3 * B as u64, "hit {hit}: a forged block was served");
    let st = v.m.stats();
    let store = st.tiers.iter().find_map(|t| t.store).unwrap();
    assert!(store.checksum_failures > 0, "{store:?}");
    drop(v);
    // A deployment with the forger's secret (or none) finds none of the deployment's records.
    let other = forger.map_or_else(StoreSetup::default, with_secret);
    let mut o = instance_with(spec, at, other);
    let blocks = victim_blocks(&o.bb);
    assert_eq!(o.admit(3, Prompt::Tokens(&next), Some(VICTIM_SALT)), 0);
    assert!(!o.holds_any(3, &blocks));
}

#[test]
fn records_forged_without_the_secret_are_rejected_on_disk() {
    for forger in [None, Some(&b"another secret"[..])] {
        let dir = TempDir::new("iso-forge-disk");
        forged_secret_probe(Where::Disk(dir.path()), forger);
    }
}

#[test]
fn records_forged_without_the_secret_are_rejected_on_the_remote_store() {
    for forger in [None, Some(&b"another secret"[..])] {
        let server = start_server();
        forged_secret_probe(Where::Remote(&server), forger);
    }
}
