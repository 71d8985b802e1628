//! Model-based test of the KV cache manager: random operation sequences (admit, chunked
//! prefill, decode, finish, abort, match, salts) checked against a small reference of what is
//! cached, with `validate()` after every operation.
//!
//! The reference keeps:
//! - the whole-block prefixes that are cached (keyed by salt and chained block contents), each
//!   with an instance id, and which running request created it (an abort removes what its
//!   request created; the manager dooms those nodes and never matches them again);
//! - the checkpoints the module docs of `manager.rs` promise (prompt end `Pc`, with the extra
//!   block when the request computed it; branch point; output end `E` of finished requests),
//!   with the running request that registered them (an abort removes those).
//!
//! From it: an upper bound on every hit (the longest cached whole-block prefix, capped so that at
//! least one token is computed), exact under the dense policy with unbounded memory, and under the
//! swa-aware policy with unbounded memory a lower bound (the deepest promised checkpoint on the
//! matched path).
//!
//! With the manager's event log on, replaying its events after every operation must give exactly
//! the blocks it caches, each stored by the request the operation named (`events::Replay`).
//!
//! Retention: admissions carry a random `Retention` (priority, a timed pin, an opt-out from
//! caching) and the clock is driven forward. An opted-out request adds nothing to the reference
//! (nor to the manager's cache), and a pin's prefix keeps at least the hit it had when the pin
//! was applied until the pin expires (unless the cap clipped pins since, or an abort may have
//! doomed nodes under it); `validate()` checks the pins against the tree and the cap.
//!
//! Debugging aids: `KVTRACE=1` prints every operation with the running requests; `KVSTATS=1`
//! prints per case how many hits were checked, how many had a positive or tight lower bound, and
//! the eviction and refusal counters (run with `--nocapture`).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use kvalloc::hash::{chain_tokens, root_seed};
use kvalloc::{
    Eviction, Extension, KVCacheManager, ManagerConfig, ManagerStats, ModelSpec, Policy, Prompt,
    Retention,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

mod events;

const B: usize = 16;
const MAX_PROMPT: usize = 640;
const SEG_LENS: [usize; 10] = [5, 16, 23, 40, 64, 100, 128, 150, 200, 37];
const SALTS: [Option<&[u8]>; 3] = [None, Some(b"tenant-a"), Some(b"tenant-b")];

/// One full layer and three sliding layers (window 128), small heads: cheap blocks.
fn small_spec() -> ModelSpec {
    let cfg = serde_json::json!({
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "sliding_window": 128, "hybrid_layer_pattern": [0, 1, 1, 1],
    });
    ModelSpec::from_hf_config(&cfg, None).unwrap()
}

/// One full group and two sliding groups of different windows (64 and 100; 100 is not a
/// multiple of the block size). HF configs carry a single window, so the second group is
/// built by hand.
fn two_window_spec() -> ModelSpec {
    let mut s = small_spec();
    let mut g2 = s.groups[1].clone();
    s.groups[1].layers = vec![1, 2];
    s.groups[1].window = Some(64);
    g2.layers = vec![3];
    g2.window = Some(100);
    g2.kv_heads = 1;
    s.groups.push(g2);
    s
}

fn segment(s: usize) -> impl Iterator<Item = i64> {
    let base = (s as i64 + 1) * 10_000;
    (0..SEG_LENS[s] as i64).map(move |j| base + j)
}

/// Chained keys of the whole blocks of `toks` under salt `salt`.
fn chain_keys(salt: u8, toks: &[i64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(toks.len() / B);
    let mut prev = 0x5eed_u64 ^ u64::from(salt);
    for blk in toks.chunks_exact(B) {
        let mut h = DefaultHasher::new();
        (prev, salt, blk).hash(&mut h);
        prev = h.finish();
        out.push(prev);
    }
    out
}

// ------------------------------------------------------------------------------------------
// Operations
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Cut {
    /// The whole base sequence.
    Full,
    /// `len * f / 1000` tokens.
    Frac(u16),
    /// The base's last whole-block boundary plus `d` tokens.
    Edge(i8),
}

#[derive(Debug, Clone)]
struct PromptGen {
    base: Option<(usize, Cut)>,
    segs: Vec<usize>,
    salt: u8,
    keep_base_salt: bool,
}

/// An admission's retention: (priority, pin of (tokens, seconds), cache).
#[derive(Debug, Clone)]
struct RetGen {
    priority: i8,
    pin: Option<(u16, u8)>,
    cache: bool,
}

impl RetGen {
    fn retention(&self) -> Retention {
        Retention {
            priority: self.priority,
            pin_tokens: self.pin.map_or(0, |(t, _)| u64::from(t)),
            pin_for: Duration::from_secs(self.pin.map_or(0, |(_, s)| u64::from(s))),
            cache: self.cache,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Admit {
        p: PromptGen,
        chunk: Option<u16>,
        ret: RetGen,
    },
    /// Drives the clock this many seconds forward (pins expire).
    Clock {
        secs: u8,
    },
    Match {
        p: PromptGen,
    },
    Extend {
        who: usize,
        n: u8,
    },
    Finish {
        who: usize,
    },
    Abort {
        who: usize,
    },
}

fn prompt_gen() -> impl Strategy<Value = PromptGen> {
    let cut = prop_oneof![
        2 => Just(Cut::Full),
        3 => (0u16..=1000).prop_map(Cut::Frac),
        3 => (-20i8..=4).prop_map(Cut::Edge),
    ];
    (
        proptest::option::weighted(0.75, (any::<usize>(), cut)),
        proptest::collection::vec(0usize..SEG_LENS.len(), 0..4),
        prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        proptest::bool::weighted(0.9),
    )
        .prop_map(|(base, segs, salt, keep_base_salt)| PromptGen {
            base,
            segs,
            salt,
            keep_base_salt,
        })
}

fn ret_gen() -> impl Strategy<Value = RetGen> {
    (
        prop_oneof![6 => Just(0i8), 1 => -3i8..=3, 1 => Just(16i8), 1 => Just(-16i8)],
        proptest::option::weighted(0.25, (0u16..700, 1u8..=30)),
        proptest::bool::weighted(0.85),
    )
        .prop_map(|(priority, pin, cache)| RetGen {
            priority,
            pin,
            cache,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (prompt_gen(), proptest::option::weighted(0.25, 16u16..300), ret_gen())
            .prop_map(|(p, chunk, ret)| Op::Admit { p, chunk, ret }),
        1 => (0u8..=20).prop_map(|secs| Op::Clock { secs }),
        3 => prompt_gen().prop_map(|p| Op::Match { p }),
        5 => (any::<usize>(), 1u8..=40).prop_map(|(who, n)| Op::Extend { who, n }),
        3 => any::<usize>().prop_map(|who| Op::Finish { who }),
        1 => any::<usize>().prop_map(|who| Op::Abort { who }),
    ]
}

// ------------------------------------------------------------------------------------------
// Reference
// ------------------------------------------------------------------------------------------

#[derive(Default)]
struct Reference {
    /// With bounded memory the manager evicts and re-creates nodes under other parents, so the
    /// reference only over-approximates: every key ever linked stays, matched by key alone.
    loose: bool,
    /// Cached prefix key -> instance.
    nodes: HashMap<u64, u64>,
    /// Instance -> its key.
    key_of: HashMap<u64, u64>,
    /// Instance -> its parent instance (the manager links and matches by hash *and* parent).
    parent_of: HashMap<u64, Option<u64>>,
    /// Instance -> running request that created it.
    creator: HashMap<u64, u64>,
    /// Instance ending a promised checkpoint -> (running request that registered it, whether
    /// the resume one block earlier is promised too).
    ckpts: HashMap<u64, (Option<u64>, bool)>,
    next: u64,
}

impl Reference {
    fn walk(&self, keys: &[u64]) -> Vec<u64> {
        let mut path: Vec<u64> = Vec::new();
        for k in keys {
            match self.nodes.get(k) {
                Some(&inst) if self.loose || self.parent_of[&inst] == path.last().copied() => {
                    path.push(inst)
                }
                _ => break,
            }
        }
        path
    }

    /// (lower, upper) bounds in tokens on the window-safe hit of a prompt of `len` tokens.
    fn bounds(&self, keys: &[u64], len: usize, dense: bool) -> (u64, u64, usize) {
        let path = self.walk(keys);
        let max_safe = (len - 1) / B;
        let upper = path.len().min(max_safe);
        if dense {
            return ((upper * B) as u64, (upper * B) as u64, path.len());
        }
        let mut lower = 0;
        for (i, inst) in path.iter().enumerate() {
            let k = i + 1;
            if let Some(&(_, extra)) = self.ckpts.get(inst) {
                if k <= max_safe {
                    lower = lower.max(k);
                }
                if extra && k - 1 <= max_safe {
                    lower = lower.max(k - 1);
                }
            }
        }
        ((lower * B) as u64, (upper * B) as u64, path.len())
    }

    /// Links keys `[path.len(), upto)` of `r` (sharing live ones, creating the rest). Linking
    /// stops at a key held under another parent, and (in a schedule call) does not go back to
    /// blocks before `first_blk`, the call's first block.
    fn link(&mut self, r: &mut Req, upto: usize, creating: bool, first_blk: Option<usize>) {
        while r.path.len() < upto {
            if !self.loose && first_blk.is_some_and(|f| r.path.len() < f) {
                break;
            }
            let key = r.keys[r.path.len()];
            let parent = r.path.last().copied();
            let held = self.nodes.get(&key).copied();
            // A node left under a doomed parent can never be matched: it gives up its key.
            let held = held.filter(|&i| self.loose || !self.parent_doomed(i));
            let inst = match held {
                Some(i) if self.loose || self.parent_of[&i] == parent => i,
                Some(_) => break, // a conflict: the rest stays private
                None => {
                    self.next += 1;
                    let i = self.next;
                    self.nodes.insert(key, i);
                    self.key_of.insert(i, key);
                    self.parent_of.insert(i, parent);
                    if creating {
                        self.creator.insert(i, r.id);
                        r.created.push(i);
                    }
                    i
                }
            };
            r.path.push(inst);
        }
    }

    /// Whether instance `i`'s parent is no longer indexed (doomed by an abort).
    fn parent_doomed(&self, i: u64) -> bool {
        match self.parent_of[&i] {
            Some(p) => self.nodes.get(&self.key_of[&p]) != Some(&p),
            None => false,
        }
    }

    /// Registers a checkpoint at block `e` of `r`'s path unless one is already there.
    fn register(&mut self, r: &Req, e: usize, owner: Option<u64>, extra: bool) {
        let inst = r.path[e - 1];
        if self.nodes.get(&r.keys[e - 1]) != Some(&inst) {
            return; // a doomed node: never matched again
        }
        self.ckpts.entry(inst).or_insert((owner, extra));
    }

    fn finish(&mut self, id: u64) {
        self.creator.retain(|_, c| *c != id);
        for v in self.ckpts.values_mut() {
            if v.0 == Some(id) {
                v.0 = None;
            }
        }
    }

    fn abort(&mut self, r: &Req) {
        self.ckpts.retain(|_, v| v.0 != Some(r.id));
        if self.loose {
            return;
        }
        for inst in &r.created {
            if self.creator.remove(inst).is_some() {
                let key = self.key_of[inst];
                if self.nodes.get(&key) == Some(inst) {
                    self.nodes.remove(&key);
                }
                self.ckpts.remove(inst);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Runner
// ------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Req {
    id: u64,
    salt: u8,
    /// Prompt, then output tokens.
    toks: Vec<i64>,
    prompt_len: usize,
    /// Scheduled tokens.
    len: usize,
    keys: Vec<u64>,
    path: Vec<u64>,
    created: Vec<u64>,
    /// Planned prompt checkpoints: (end block, extra block promised).
    plans: Vec<(usize, bool)>,
    plans_done: usize,
    /// Stats before admission when it was admitted alone and nothing else was admitted since.
    alone: Option<ManagerStats>,
    /// What it asked of the cache.
    retention: Retention,
}

/// A pin the manager applied: until `expires`, a prompt of `toks` (and one more token) under
/// `salt` hits at least `hit`.
#[derive(Debug, Clone)]
struct PinCheck {
    salt: u8,
    toks: Vec<i64>,
    keys: Vec<u64>,
    hit: u64,
    expires: u64,
}

struct Harness {
    m: KVCacheManager,
    dense: bool,
    unbounded: bool,
    reference: Reference,
    running: Vec<Req>,
    history: Vec<(u8, Vec<i64>)>,
    next_id: u64,
    next_tok: i64,
    hits_checked: u64,
    /// Probes a router from the events found exactly (a positive hit), and short of the hit.
    router_exact: u64,
    router_short: u64,
    /// Hits whose promised lower bound was positive / equal to the upper bound.
    lower_positive: u64,
    tight: u64,
    /// An abort happened while other requests ran: it may have left doomed nodes, which a later
    /// request frees when it takes their hashes over (so an abort can end below its "before").
    doomed_possible: bool,
    /// The cache as the manager's events describe it.
    replay: events::Replay,
    /// The manager's (driven) clock in seconds.
    now: u64,
    /// The pins in force whose hits are checked after every operation.
    pins: Vec<PinCheck>,
    /// `pins_clipped` when the checks were last valid (a clip may shorten any pin).
    clipped: u64,
    /// Pinned prefixes checked (all operations together).
    pins_checked: u64,
}

fn err(m: String) -> TestCaseError {
    TestCaseError::fail(m)
}

impl Harness {
    #[allow(clippy::too_many_arguments)]
    fn new(
        spec: ModelSpec,
        capacity: u64,
        policy: Policy,
        eviction: Eviction,
        paged: bool,
        slab_bytes: Option<u64>,
        pin_cap: Option<u64>,
        speculate: bool,
    ) -> Self {
        let config = ManagerConfig {
            policy,
            eviction,
            events: true,
            prefill_reads_cache: paged,
            slab_bytes,
            max_pinned_bytes: pin_cap,
            speculative_checkpoints: speculate,
            ..ManagerConfig::default()
        };
        let mut m = KVCacheManager::new(spec, capacity, config).unwrap();
        m.set_clock(Duration::ZERO).unwrap();
        Harness {
            m,
            dense: policy == Policy::Dense,
            unbounded: capacity >= UNBOUNDED,
            reference: Reference {
                loose: capacity < UNBOUNDED,
                ..Reference::default()
            },
            running: Vec::new(),
            history: Vec::new(),
            next_id: 0,
            next_tok: 1_000_000,
            hits_checked: 0,
            router_exact: 0,
            router_short: 0,
            lower_positive: 0,
            tight: 0,
            doomed_possible: false,
            replay: events::Replay::default(),
            now: 0,
            pins: Vec::new(),
            clipped: 0,
            pins_checked: 0,
        }
    }

    /// The request whose call `op` is: the only one whose blocks it may store.
    fn publisher(&self, op: &Op) -> Option<u64> {
        let running = |who: usize| {
            (!self.running.is_empty()).then(|| self.running[who % self.running.len()].id)
        };
        match *op {
            Op::Admit { .. } => Some(self.next_id + 1),
            Op::Match { .. } | Op::Clock { .. } => None,
            Op::Extend { who, .. } | Op::Finish { who } | Op::Abort { who } => running(who),
        }
    }

    /// Runs `op`, then checks the manager's state and its events.
    fn step_checked(&mut self, op: &Op, what: &str) -> Result<(), TestCaseError> {
        let publisher = self.publisher(op);
        self.step(op).map_err(|e| err(format!("{what}: {e}")))?;
        self.check_state(what)?;
        self.replay
            .sync(&mut self.m, Some(publisher))
            .map_err(|e| err(format!("events after {what}: {e}")))
    }

    fn build(&self, p: &PromptGen) -> (u8, Vec<i64>) {
        let mut salt = p.salt;
        let mut toks = Vec::new();
        if let (Some((i, cut)), false) = (&p.base, self.history.is_empty()) {
            let (s, base) = &self.history[i % self.history.len()];
            if p.keep_base_salt {
                salt = *s;
            }
            let n = match *cut {
                Cut::Full => base.len(),
                Cut::Frac(f) => base.len() * usize::from(f) / 1000,
                Cut::Edge(d) => {
                    let edge = (base.len() / B * B) as i64 + i64::from(d);
                    edge.clamp(0, base.len() as i64) as usize
                }
            };
            toks.extend_from_slice(&base[..n]);
        }
        for &s in &p.segs {
            toks.extend(segment(s));
        }
        toks.truncate(MAX_PROMPT);
        if toks.is_empty() {
            toks.extend(segment(1));
        }
        (salt, toks)
    }

    /// Checks a hit against the reference; returns the matched depth.
    fn check_hit(
        &mut self,
        what: &str,
        salt: u8,
        toks: &[i64],
        hit: u64,
    ) -> Result<(), TestCaseError> {
        let keys = chain_keys(salt, toks);
        let (lower, upper, depth) = self.reference.bounds(&keys, toks.len(), self.dense);
        self.hits_checked += 1;
        self.lower_positive += u64::from(lower > 0);
        self.tight += u64::from(lower == upper && upper > 0);
        prop_assert!(
            hit.is_multiple_of(B as u64),
            "{}: hit {} not block aligned",
            what,
            hit
        );
        prop_assert!(
            hit < toks.len() as u64,
            "{}: hit {} >= len {}",
            what,
            hit,
            toks.len()
        );
        prop_assert!(
            hit <= upper,
            "{}: hit {} > upper bound {} (len {}, cached depth {} blocks)",
            what,
            hit,
            upper,
            toks.len(),
            depth
        );
        if self.unbounded {
            prop_assert!(
                hit >= lower,
                "{}: hit {} < promised lower bound {} (len {}, depth {}, dense {})",
                what,
                hit,
                lower,
                toks.len(),
                depth,
                self.dense
            );
        }
        Ok(())
    }

    /// A router that knows only the replayed events (synced after the last operation) never
    /// estimates more than the hit `match_prefix` reports, and finds it exactly when the hit
    /// ends at a resume point (always, where every node is one: the dense policy).
    fn check_router(&mut self, salt: u8, toks: &[i64], hit: u64) -> Result<(), TestCaseError> {
        let mut hashes = Vec::new();
        chain_tokens(root_seed(SALTS[salt as usize]), toks, B, &mut hashes);
        let est = events::router_hit(&self.replay.resume, &hashes, toks.len(), B);
        prop_assert!(est <= hit, "router estimate {} > hit {}", est, hit);
        let at_point = hit == 0
            || self
                .replay
                .resume
                .contains_key(&hashes[hit as usize / B - 1]);
        prop_assert_eq!(est == hit, at_point, "estimate {} hit {}", est, hit);
        prop_assert!(
            !self.dense || est == hit,
            "dense: every node is a resume point"
        );
        self.router_exact += u64::from(est == hit && hit > 0);
        self.router_short += u64::from(est < hit);
        Ok(())
    }

    /// Mirrors a schedule call of request `idx` that started at token `start` (an opted-out
    /// request links and registers nothing).
    fn after_schedule(&mut self, idx: usize, start: usize) {
        let r = &mut self.running[idx];
        if !r.retention.cache {
            return;
        }
        let n_full = r.prompt_len / B;
        let whole_end = (r.len / B).min(n_full);
        self.reference.link(r, whole_end, true, Some(start / B));
        let r = &mut self.running[idx];
        while r.plans_done < r.plans.len() && r.plans[r.plans_done].0 <= whole_end {
            let (e, extra) = r.plans[r.plans_done];
            r.plans_done += 1;
            if e > r.path.len() {
                continue; // not linked (a conflict)
            }
            let rr = r.clone();
            self.reference.register(&rr, e, Some(rr.id), extra);
        }
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Match { p } => {
                let (salt, toks) = self.build(p);
                let hit = self
                    .m
                    .match_prefix(Prompt::Tokens(&toks), SALTS[salt as usize])
                    .map_err(|e| err(format!("match_prefix: {e}")))?;
                self.check_hit("match", salt, &toks, hit)?;
                self.check_router(salt, &toks, hit)?;
            }
            Op::Clock { secs } => {
                self.m
                    .advance_clock(Duration::from_secs(u64::from(*secs)))
                    .map_err(|e| err(format!("advance_clock: {e}")))?;
                self.now += u64::from(*secs);
            }
            Op::Admit { p, chunk, ret } => {
                let (salt, toks) = self.build(p);
                let before = self
                    .m
                    .match_prefix(Prompt::Tokens(&toks), SALTS[salt as usize]);
                let before = before.map_err(|e| err(format!("match_prefix: {e}")))?;
                let keys = chain_keys(salt, &toks);
                let depth = self.reference.walk(&keys).len();
                // Alone, and no pin that could expire (and free bytes) while it runs.
                let snap =
                    (self.running.is_empty() && self.m.stats().pins == 0).then(|| self.m.stats());
                self.next_id += 1;
                let id = self.next_id;
                let retention = ret.retention();
                let res = self
                    .m
                    .admit_with_retention(
                        id,
                        Prompt::Tokens(&toks),
                        SALTS[salt as usize],
                        chunk.map(u64::from),
                        retention,
                    )
                    .map_err(|e| err(format!("admit: {e}")))?;
                let Some(hit) = res else {
                    prop_assert!(!self.unbounded, "admission refused with unbounded memory");
                    prop_assert!(!self.m.is_running(id), "refused admission left a request");
                    return Ok(());
                };
                prop_assert_eq!(
                    hit,
                    before,
                    "admit's hit differs from match_prefix just before"
                );
                self.check_hit("admit", salt, &toks, hit)?;
                for r in &mut self.running {
                    r.alone = None;
                }
                let n_full = toks.len() / B;
                let safe = hit as usize / B;
                let mut plans = Vec::new();
                if !self.dense && retention.cache {
                    if safe < depth && depth < n_full {
                        plans.push((depth, false));
                    }
                    if n_full > 0 {
                        plans.push((n_full, safe < n_full));
                    }
                }
                let len = match chunk {
                    Some(c) => toks.len().min(hit as usize + usize::from(*c)),
                    None => toks.len(),
                };
                self.history.push((salt, toks.clone()));
                let prompt_len = toks.len();
                let paths = self.reference.walk(&keys);
                self.running.push(Req {
                    id,
                    salt,
                    toks,
                    prompt_len,
                    len,
                    keys,
                    path: paths,
                    created: Vec::new(),
                    plans,
                    plans_done: 0,
                    alone: snap,
                    retention,
                });
                let idx = self.running.len() - 1;
                self.after_schedule(idx, hit as usize);
                prop_assert_eq!(self.m.num_tokens(id).unwrap(), len as u64);
            }
            Op::Extend { who, n } => {
                if self.running.is_empty() {
                    return Ok(());
                }
                let idx = who % self.running.len();
                let r = &self.running[idx];
                let id = r.id;
                let start = r.len;
                let ok;
                if r.len < r.prompt_len {
                    let c = (usize::from(*n) * 8).min(r.prompt_len - r.len);
                    ok = self
                        .m
                        .extend(id, Extension::Count(c as u64))
                        .map_err(|e| err(format!("extend count: {e}")))?;
                    if ok {
                        self.running[idx].len += c;
                    }
                } else {
                    let toks: Vec<i64> = (0..i64::from(*n)).map(|j| self.next_tok + j).collect();
                    ok = self
                        .m
                        .extend(id, Extension::Tokens(&toks))
                        .map_err(|e| err(format!("extend tokens: {e}")))?;
                    if ok {
                        self.next_tok += i64::from(*n);
                        let r = &mut self.running[idx];
                        r.toks.extend_from_slice(&toks);
                        r.len += toks.len();
                        r.keys = chain_keys(r.salt, &r.toks);
                    }
                }
                prop_assert!(
                    ok || !self.unbounded,
                    "extension refused with unbounded memory"
                );
                if ok {
                    self.after_schedule(idx, start);
                    let r = &self.running[idx];
                    prop_assert_eq!(self.m.num_tokens(id).unwrap(), r.len as u64);
                }
            }
            Op::Finish { who } => {
                if self.running.is_empty() {
                    return Ok(());
                }
                let mut r = self.running.remove(who % self.running.len());
                let clipped = self.m.stats().pins_clipped;
                self.m
                    .finish(r.id)
                    .map_err(|e| err(format!("finish: {e}")))?;
                if r.retention.cache {
                    let whole = r.len / B;
                    self.reference.link(&mut r, whole, false, None);
                    // After a linking conflict the manager tries a checkpoint at the end of the
                    // linked path instead of E; its window has usually left the running window,
                    // so nothing is promised there.
                    let e = r.len / B;
                    if e > 0 && e <= r.path.len() && !self.dense {
                        self.reference.register(&r, e, None, false);
                    }
                }
                self.reference.finish(r.id);
                if self.m.stats().pins_clipped == clipped {
                    self.check_new_pin(&r)?;
                }
                self.history.push((r.salt, r.toks[..r.len].to_vec()));
            }
            Op::Abort { who } => {
                if self.running.is_empty() {
                    return Ok(());
                }
                let r = self.running.remove(who % self.running.len());
                self.m.abort(r.id).map_err(|e| err(format!("abort: {e}")))?;
                self.forget_pins_under(&r);
                self.reference.abort(&r);
                // Another request shared or extended what this one created: it is doomed.
                if !self.running.is_empty() || r.alone.is_none() {
                    self.doomed_possible = true;
                }
                if let Some(before) = &r.alone {
                    let after = self.m.stats();
                    if self.doomed_possible {
                        prop_assert!(
                            after.bytes_in_use <= before.bytes_in_use,
                            "abort kept bytes"
                        );
                    } else if after.evicted_leaves == before.evicted_leaves
                        && after.evicted_checkpoints == before.evicted_checkpoints
                    {
                        prop_assert_eq!(
                            after.bytes_in_use,
                            before.bytes_in_use,
                            "abort kept bytes"
                        );
                        prop_assert_eq!(
                            after.cached_blocks,
                            before.cached_blocks,
                            "abort kept blocks"
                        );
                        prop_assert_eq!(
                            after.checkpoints,
                            before.checkpoints,
                            "abort kept checkpoints"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// After request `r` finished: records the hit its pin (if any) guarantees.
    fn check_new_pin(&mut self, r: &Req) -> Result<(), TestCaseError> {
        // An opted-out request pins what it read; others may have cached more of its prompt
        // than that, so its prefix's hit says nothing about its pin.
        let want = (r.retention.pin_tokens as usize).min(r.len) / B * B;
        if want == 0 || !r.retention.cache {
            return Ok(());
        }
        // A pin stops at a doomed node (an aborted request created it), while another request
        // may have cached the same blocks again: then the prefix's hit is not the pin's.
        let live = if self.reference.loose {
            !self.doomed_possible
        } else {
            r.path[..(want / B).min(r.path.len())]
                .iter()
                .all(|i| self.reference.nodes.get(&self.reference.key_of[i]) == Some(i))
        };
        if !live {
            return Ok(());
        }
        let mut toks = r.toks[..want].to_vec();
        toks.push(-7);
        let hit = self
            .m
            .match_prefix(Prompt::Tokens(&toks), SALTS[r.salt as usize])
            .map_err(|e| err(format!("match_prefix: {e}")))?;
        let expires = self.now + r.retention.pin_for.as_secs();
        if hit > 0 {
            prop_assert!(self.m.stats().pins > 0, "a pinned prefix but no pin");
            let keys = chain_keys(r.salt, &toks);
            self.pins.push(PinCheck {
                salt: r.salt,
                toks,
                keys,
                hit,
                expires,
            });
        }
        Ok(())
    }

    /// An abort dooms the nodes its request created, pinned or not: the checks over them go
    /// (all of them with bounded memory, where the reference does not know who created what).
    fn forget_pins_under(&mut self, r: &Req) {
        if self.reference.loose {
            self.pins.clear();
            return;
        }
        let created: Vec<u64> = r
            .created
            .iter()
            .filter_map(|i| self.reference.key_of.get(i).copied())
            .collect();
        self.pins
            .retain(|p| !p.keys.iter().any(|k| created.contains(k)));
    }

    /// Every pin in force still gives its prefix at least the hit it had when applied.
    fn check_pins(&mut self, what: &str) -> Result<(), TestCaseError> {
        let now = self.now;
        self.pins.retain(|p| p.expires > now);
        let clipped = self.m.stats().pins_clipped;
        if clipped != self.clipped {
            self.clipped = clipped;
            self.pins.clear();
        }
        self.pins_checked += self.pins.len() as u64;
        for p in &self.pins {
            let hit = self
                .m
                .match_prefix(Prompt::Tokens(&p.toks), SALTS[p.salt as usize])
                .map_err(|e| err(format!("match_prefix: {e}")))?;
            prop_assert!(
                hit >= p.hit,
                "{}: a pinned prefix hits {} < {} (expires at {} s, now {} s)",
                what,
                hit,
                p.hit,
                p.expires,
                now
            );
        }
        if self.pins.is_empty() && self.m.stats().pins == 0 {
            prop_assert_eq!(self.m.stats().pinned_bytes, 0);
        }
        Ok(())
    }

    fn check_state(&mut self, what: &str) -> Result<(), TestCaseError> {
        if let Err(e) = self.m.validate() {
            return Err(err(format!("validate after {what}: {e}")));
        }
        self.check_pins(what)?;
        let st = self.m.stats();
        prop_assert!(
            st.bytes_in_use <= st.capacity_bytes,
            "bytes in use over capacity"
        );
        prop_assert_eq!(st.running_requests, self.running.len() as u64);
        Ok(())
    }

    fn drain(&mut self, abort_mask: u64) -> Result<(), TestCaseError> {
        let mut k = 0;
        while !self.running.is_empty() {
            let op = if abort_mask >> (k % 64) & 1 == 1 {
                Op::Abort { who: 0 }
            } else {
                Op::Finish { who: 0 }
            };
            k += 1;
            self.step_checked(&op, "drain")?;
        }
        let st = self.m.stats();
        prop_assert_eq!(st.running_requests, 0);
        for (g, gs) in st.groups.iter().enumerate() {
            prop_assert_eq!(gs.running, 0, "group {} still has running blocks", g);
        }
        let block_bytes = self.m.spec().block_bytes(16);
        let held: u64 = st
            .groups
            .iter()
            .zip(&block_bytes)
            .map(|(g, b)| g.cached * b)
            .sum();
        prop_assert_eq!(
            st.bytes_in_use,
            held,
            "bytes in use != bytes the cache holds"
        );
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn run_ops(
    spec: ModelSpec,
    capacity: u64,
    policy: Policy,
    eviction: Eviction,
    ops: &[Op],
    abort_mask: u64,
    slab_bytes: Option<u64>,
    pin_cap: Option<u64>,
) -> Result<(), TestCaseError> {
    // The mask's top bit: an engine whose prefill reads the chunk from the cache; the next:
    // speculative checkpoints.
    let paged = abort_mask >> 63 == 1;
    let speculate = (abort_mask >> 62) & 1 == 1;
    let mut h = Harness::new(
        spec, capacity, policy, eviction, paged, slab_bytes, pin_cap, speculate,
    );
    for (i, op) in ops.iter().enumerate() {
        if std::env::var("KVTRACE").is_ok() {
            let st = h.m.stats();
            eprintln!(
                "op {i} {op:?} running {:?} ckpts {} nodes {}",
                h.running
                    .iter()
                    .map(|r| (r.id, r.len, r.path.len()))
                    .collect::<Vec<_>>(),
                st.checkpoints,
                st.cached_blocks
            );
        }
        h.step_checked(op, &format!("op {i} {op:?}"))?;
    }
    h.drain(abort_mask)?;
    if std::env::var("KVSTATS").is_ok() {
        let st = h.m.stats();
        eprintln!(
            "STATS hits {} lower>0 {} tight {} evicted {}/{} refused {}/{} aborted_blocks {} \
             pins checked {} in force {} clipped {} router exact {} short {}",
            h.hits_checked,
            h.lower_positive,
            h.tight,
            st.evicted_leaves,
            st.evicted_checkpoints,
            st.admissions_refused,
            st.extensions_refused,
            st.aborted_blocks,
            h.pins_checked,
            st.pins,
            st.pins_clipped,
            h.router_exact,
            h.router_short
        );
    }
    Ok(())
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const UNBOUNDED: u64 = 32 << 20; // far more than 60 operations can fill: nothing is evicted

proptest! {
    #![proptest_config(cfg(128))]

    #[test]
    fn swa_aware_unbounded_matches_reference(
        ops in proptest::collection::vec(op(), 1..60),
        mask in any::<u64>(),
    ) {
        run_ops(small_spec(), UNBOUNDED, Policy::SwaAware, Eviction::Value, &ops, mask, None, None)?;
    }

    #[test]
    fn dense_unbounded_is_exact(
        ops in proptest::collection::vec(op(), 1..60),
        mask in any::<u64>(),
    ) {
        run_ops(small_spec(), UNBOUNDED, Policy::Dense, Eviction::Value, &ops, mask, None, None)?;
    }

    #[test]
    fn two_windows_unbounded(
        ops in proptest::collection::vec(op(), 1..60),
        mask in any::<u64>(),
    ) {
        run_ops(two_window_spec(), UNBOUNDED, Policy::SwaAware, Eviction::Value, &ops, mask, None, None)?;
    }

    #[test]
    fn bounded_capacity_stays_consistent(
        ops in proptest::collection::vec(op(), 1..80),
        mask in any::<u64>(),
        cap_kib in prop_oneof![Just(64u64), Just(128u64), Just(192u64), Just(384u64)],
        dense in proptest::bool::weighted(0.25),
        two in any::<bool>(),
        lru in any::<bool>(),
        coarse in any::<bool>(),
        // Small caps on pinned bytes: pins clipped, and shortened when a checkpoint is laid
        // over a pinned prefix.
        pin_cap in prop_oneof![Just(None), Just(Some(4u64 << 10)), Just(Some(16 << 10)), Just(Some(40 << 10))],
    ) {
        let spec = if two { two_window_spec() } else { small_spec() };
        let policy = if dense { Policy::Dense } else { Policy::SwaAware };
        let eviction = if lru { Eviction::Lru } else { Eviction::Value };
        // Coarse slabs (four of the largest blocks, several of every class): eviction then
        // often has to empty whole slabs (`make_room`'s placement path).
        let slab = coarse.then(|| {
            let bytes = spec.block_bytes(ManagerConfig::default().block_tokens);
            let lcm = bytes.iter().fold(1u64, |a, &b| a / gcd(a, b) * b);
            4 * lcm
        });
        run_ops(spec, cap_kib << 10, policy, eviction, &ops, mask, slab, pin_cap)?;
    }
}

/// Regression (found by the model test): aborting a request whose prompt nodes another running
/// request still shares dooms them; a later request with the same prompt must be able to cache
/// it again (it used to insert a second node under the doomed node's hash).
#[test]
fn abort_of_shared_prompt_then_same_prompt_again() {
    let mut m = KVCacheManager::new(small_spec(), UNBOUNDED, ManagerConfig::default()).unwrap();
    let p: Vec<i64> = (0..200).collect();
    let mut q = p.clone();
    q.extend(5000..5050);
    m.admit(1, Prompt::Tokens(&p), None, None).unwrap().unwrap();
    assert_eq!(
        m.admit(2, Prompt::Tokens(&q), None, None).unwrap(),
        Some(192)
    );
    m.abort(1).unwrap();
    m.validate().unwrap();
    assert_eq!(
        m.match_prefix(Prompt::Tokens(&q), None).unwrap(),
        0,
        "doomed: never matched"
    );
    assert_eq!(m.admit(3, Prompt::Tokens(&p), None, None).unwrap(), Some(0));
    m.validate().unwrap();
    m.finish(2).unwrap();
    m.validate().unwrap();
    m.finish(3).unwrap();
    m.validate().unwrap();
    assert_eq!(m.match_prefix(Prompt::Tokens(&q), None).unwrap(), 192);
}

/// Regression (found by the model test): a chunked prefill whose prompt matches the tree's full
/// KV deeper than its window-safe hit pins the whole matched path from admission.
#[test]
fn chunked_prefill_behind_a_deep_full_match_validates() {
    let mut m = KVCacheManager::new(small_spec(), UNBOUNDED, ManagerConfig::default()).unwrap();
    let a: Vec<i64> = (0..1024).collect();
    m.admit(1, Prompt::Tokens(&a), None, None).unwrap().unwrap();
    m.finish(1).unwrap();
    let mut early = a[..700].to_vec();
    early.extend(60_000..60_300);
    assert_eq!(
        m.admit(2, Prompt::Tokens(&early), None, Some(64)).unwrap(),
        Some(0)
    );
    m.validate().unwrap();
    while m.num_tokens(2).unwrap() < 1000 {
        let left = 1000 - m.num_tokens(2).unwrap();
        assert!(m.extend(2, Extension::Count(left.min(64))).unwrap());
        m.validate().unwrap();
    }
    m.finish(2).unwrap();
    let mut next = a[..700].to_vec();
    next.extend(62_000..62_100);
    assert_eq!(m.match_prefix(Prompt::Tokens(&next), None).unwrap(), 688);
}

/// Regression (found by the model test): a chunk that ends inside a block leaves that block in
/// the table; when the next chunk completes it, it must still go to the tree (the node used to
/// be inserted without its full-attention block).
#[test]
fn chunk_boundary_inside_a_block() {
    for policy in [Policy::SwaAware, Policy::Dense] {
        let config = ManagerConfig {
            policy,
            ..ManagerConfig::default()
        };
        let mut a = KVCacheManager::new(small_spec(), UNBOUNDED, config.clone()).unwrap();
        let mut b = KVCacheManager::new(small_spec(), UNBOUNDED, config).unwrap();
        let p: Vec<i64> = (0..246).collect();
        a.admit(1, Prompt::Tokens(&p), None, None).unwrap().unwrap();
        assert_eq!(
            b.admit(1, Prompt::Tokens(&p), None, Some(17)).unwrap(),
            Some(0)
        );
        while b.num_tokens(1).unwrap() < 246 {
            let left = 246 - b.num_tokens(1).unwrap();
            assert!(b.extend(1, Extension::Count(left.min(23))).unwrap());
            b.validate().unwrap();
        }
        for m in [&mut a, &mut b] {
            m.finish(1).unwrap();
            m.validate().unwrap();
        }
        let (sa, sb) = (a.stats(), b.stats());
        assert_eq!(
            sa.groups, sb.groups,
            "{policy:?}: chunked caches what one shot does"
        );
        assert_eq!(sa.checkpoints, sb.checkpoints, "{policy:?}");
        assert_eq!(sa.bytes_in_use, sb.bytes_in_use, "{policy:?}");
        let mut q = p.clone();
        q.extend(90_000..90_010);
        assert_eq!(
            b.match_prefix(Prompt::Tokens(&q), None).unwrap(),
            240,
            "{policy:?}"
        );
    }
}

/// Regression (found by the model test): a linking conflict in one chunk, then the conflicting
/// node going away, then the next chunk (it used to underflow `i - first_blk`).
#[test]
fn chunk_after_a_linking_conflict() {
    let mut m =
        KVCacheManager::new(two_window_spec(), UNBOUNDED, ManagerConfig::default()).unwrap();
    let p: Vec<i64> = (0..64).collect();
    let mut q = p.clone();
    q.extend(1000..1064);
    let mut r = q.clone();
    r.extend(2000..2100);
    m.admit(1, Prompt::Tokens(&p), None, None).unwrap().unwrap();
    m.admit(2, Prompt::Tokens(&q), None, None).unwrap().unwrap();
    // 1's nodes are doomed (2 pins them); 2's nodes hang below them.
    m.abort(1).unwrap();
    // 3 re-creates 1's prefix, then meets 2's node under the doomed parent: linking stops.
    assert_eq!(
        m.admit(3, Prompt::Tokens(&r), None, Some(80)).unwrap(),
        Some(0)
    );
    m.validate().unwrap();
    m.abort(2).unwrap(); // the conflicting nodes go
    m.validate().unwrap();
    while m.num_tokens(3).unwrap() < r.len() as u64 {
        let left = r.len() as u64 - m.num_tokens(3).unwrap();
        assert!(m.extend(3, Extension::Count(left.min(40))).unwrap());
        m.validate().unwrap();
    }
    m.finish(3).unwrap();
    m.validate().unwrap();
}

/// Regression (found by the model test): with a window that is not a multiple of the block size
/// (100 here), the output-end checkpoint `[E - W, E)` reaches one block below the running window
/// `[len - W, len)`; that block used to be released, so no checkpoint was kept at E.
#[test]
fn output_end_checkpoint_with_a_window_not_a_multiple_of_the_block() {
    for chunked in [false, true] {
        let mut m =
            KVCacheManager::new(two_window_spec(), UNBOUNDED, ManagerConfig::default()).unwrap();
        let p: Vec<i64> = (0..200).collect();
        if chunked {
            // Finished after a first chunk of 116 tokens: E = 112.
            m.admit(1, Prompt::Tokens(&p), None, Some(116))
                .unwrap()
                .unwrap();
        } else {
            // A 100-token prompt decoding 16 tokens: len 116, E = 112.
            m.admit(1, Prompt::Tokens(&p[..100]), None, None)
                .unwrap()
                .unwrap();
            assert!(m.extend(1, Extension::Tokens(&p[100..116])).unwrap());
        }
        m.validate().unwrap();
        m.finish(1).unwrap();
        m.validate().unwrap();
        assert_eq!(
            m.match_prefix(Prompt::Tokens(&p), None).unwrap(),
            112,
            "chunked {chunked}"
        );
    }
}

/// Regression: aborting a request whose prompt nodes another running request shares dooms them,
/// and the sharer's deeper nodes are left under the doomed parent, unreachable. A later request
/// with the same prefix must still cache its blocks: linking takes the orphans' hashes over
/// (`PrefixTree::claim_child`) instead of stopping at a conflict.
#[test]

fn same_prompt_after_an_abort_of_a_shared_prefix_is_cached_again() {
    let mut m = KVCacheManager::new(small_spec(), UNBOUNDED, ManagerConfig::default()).unwrap();
    let p: Vec<i64> = (0..64).collect();
    let mut q = p.clone();
    q.extend(1000..1064);
    m.admit(1, Prompt::Tokens(&p), None, None).unwrap().unwrap();
    m.admit(2, Prompt::Tokens(&q), None, None).unwrap().unwrap();
    m.abort(1).unwrap();
    m.finish(2).unwrap();
    let mut r = q.clone();
    r.extend(2000..2100); // 228 tokens: prompt end 224
    assert_eq!(m.admit(3, Prompt::Tokens(&r), None, None).unwrap(), Some(0));
    m.finish(3).unwrap();
    m.validate().unwrap();
    // An identical prompt resumes at the last whole block (4 tokens are left to compute).
    assert_eq!(
        m.admit(4, Prompt::Tokens(&r), None, None).unwrap(),
        Some(224)
    );
}
