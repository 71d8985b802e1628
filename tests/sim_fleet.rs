//! The fleet simulator (`kvalloc::sim::fleet`): one instance replays exactly as the plain
//! replay, routers spread or concentrate load as they say, the shared remote tier serves one
//! instance's blocks to another, and the prefix-aware routers' estimates against the real hits
//! (the window-safe one never over-estimates, even when its score credits stored blocks; the
//! naive one does, on a sliding-window model).
//! Runs on a prefix of the Mooncake conversation trace or a small generated workload.

use std::path::Path;
use std::sync::Arc;

use kvalloc::sim::{
    generate, readers, FleetConfig, FleetReport, RouterKind, RunConfig, ServiceModel, SimReport,
    Simulator, TierBudget, Trace,
};
use kvalloc::tiers::Tier;
use kvalloc::{Error, Eviction, ModelSpec, Policy};

const TRACE: &str = "python/kvalloc/data/mooncake_conversation.jsonl";

/// The first `n` requests of the conversation trace.
fn conversation(n: usize) -> Trace {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(TRACE)).unwrap();
    let head: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    readers::parse_trace(&head, "conversation-head", readers::ReadOptions::default()).unwrap()
}

fn mimo() -> ModelSpec {
    ModelSpec::preset("mimo-v2.5-pro").unwrap()
}

fn cfg(device_bytes: u64, lower_tiers: Vec<TierBudget>) -> RunConfig {
    RunConfig {
        policy: Policy::SwaAware,
        eviction: Eviction::Value,
        device_bytes,
        lower_tiers,
        service: ServiceModel::default(),
        overlap: Default::default(),
        load_policy: Default::default(),
    }
}

fn host(bytes: u64) -> Vec<TierBudget> {
    vec![TierBudget {
        tier: Tier::Host,
        bytes,
    }]
}

fn fleet(sim: &Simulator, cfg: &RunConfig, n: u32, router: RouterKind) -> FleetReport {
    sim.run_fleet(
        cfg,
        &FleetConfig::new(n, router),
        router.name(),
        &mut |_, _| true,
    )
    .unwrap()
}

/// Everything a replay measures that does not depend on the wall clock.
fn figures(r: &SimReport) -> SimReport {
    SimReport {
        wall_seconds: 0.0,
        ..r.clone()
    }
}

#[test]
fn one_instance_with_any_router_is_the_plain_replay() {
    let sim = Simulator::new(mimo(), Arc::new(conversation(400)), 128).unwrap();
    // Small enough that eviction and the host tier both matter.
    let c = cfg(12 << 30, host(48 << 30));
    let plain = sim.run(&c, "plain", &mut |_, _| true).unwrap();
    assert!(plain.evicted_leaves > 0 && plain.tier_hit_tokens[0] > 0);
    for router in RouterKind::ALL {
        let r = fleet(&sim, &c, 1, router);
        assert_eq!(figures(&r.report), figures(&plain), "{}", router.name());
        assert_eq!(r.per_instance[0].requests, 400);
        assert_eq!(r.per_instance[0].hit_tokens, plain.hit_tokens);
    }
}

#[test]
fn round_robin_spreads_requests_evenly_and_least_loaded_balances_work() {
    let sim = Simulator::new(mimo(), Arc::new(conversation(300)), 128).unwrap();
    let c = cfg(16 << 30, vec![]);
    let rr = fleet(&sim, &c, 4, RouterKind::RoundRobin);
    let counts: Vec<u64> = rr.per_instance.iter().map(|x| x.requests).collect();
    assert_eq!(counts, vec![75; 4]);
    assert_eq!(rr.request_imbalance(), 1.0);
    assert!(rr.estimate.is_none());
    let ll = fleet(&sim, &c, 4, RouterKind::LeastLoaded);
    assert_eq!(ll.per_instance.iter().map(|x| x.requests).sum::<u64>(), 300);
    // Balancing work (tokens), not request counts.
    assert!(
        ll.token_imbalance() <= rr.token_imbalance() * 1.05,
        "{} vs {}",
        ll.token_imbalance(),
        rr.token_imbalance()
    );
    for r in [&rr, &ll] {
        assert_eq!(r.report.completed + r.report.rejected, 300);
        assert!(r.report.hit_tokens <= r.report.upper_bound_hit_tokens);
    }
}

#[test]
fn the_shared_remote_serves_one_instances_blocks_to_another() {
    // Chat sessions: under round robin a session's next turn lands on another instance, whose
    // only way to the previous turn's KV is the shared remote tier.
    let trace = generate::generate("chat", 3, Some(24)).unwrap();
    let sim = Simulator::new(mimo(), Arc::new(trace), 64).unwrap();
    let alone = fleet(&sim, &cfg(8 << 30, vec![]), 4, RouterKind::RoundRobin);
    let remote = vec![TierBudget {
        tier: Tier::Remote,
        bytes: 1 << 40,
    }];
    let shared = fleet(&sim, &cfg(8 << 30, remote), 4, RouterKind::RoundRobin);
    let t = &shared.report.tier_hit_tokens;
    assert!(t[Tier::Remote as usize] > 0, "{t:?}");
    assert!(shared.report.hit_tokens > alone.report.hit_tokens);
    let store = shared.shared_remote.expect("a shared store");
    assert!(store.records > 0 && store.counters.gets > 0);
    let traffic = &shared.report.tiers[0];
    assert_eq!(traffic.tier, Tier::Remote);
    assert_eq!(traffic.bytes_written, store.counters.bytes_written);
    assert_eq!(traffic.bytes_read, store.counters.bytes_read);
}

#[test]
fn a_small_shared_store_evicts_and_its_readers_miss_without_failing() {
    let trace = generate::generate("chat", 5, Some(24)).unwrap();
    let sim = Simulator::new(mimo(), Arc::new(trace), 64).unwrap();
    let remote = vec![TierBudget {
        tier: Tier::Remote,
        bytes: 2 << 30,
    }];
    let r = fleet(&sim, &cfg(8 << 30, remote), 4, RouterKind::RoundRobin);
    let store = r.shared_remote.unwrap();
    assert!(store.evicted > 0);
    assert!(store.bytes <= 2 << 30);
    assert_eq!(r.report.completed + r.report.rejected, r.report.requests);
}

#[test]
fn prefix_routers_concentrate_sessions_and_beat_round_robin() {
    let sim = Simulator::new(mimo(), Arc::new(conversation(600)), 128).unwrap();
    let c = cfg(32 << 30, vec![]);
    let rr = fleet(&sim, &c, 8, RouterKind::RoundRobin);
    let prefix = fleet(&sim, &c, 8, RouterKind::Prefix);
    assert!(
        prefix.report.hit_tokens > rr.report.hit_tokens,
        "{} vs {}",
        prefix.report.hit_rate(),
        rr.report.hit_rate()
    );
}

#[test]
fn the_window_safe_router_never_over_estimates_and_the_naive_one_does() {
    let sim = Simulator::new(mimo(), Arc::new(conversation(600)), 128).unwrap();
    // No lower tier and room enough that nothing waits between routing and admission: the
    // estimate is what the instance holds when the request arrives.
    let c = cfg(32 << 30, vec![]);
    let safe = fleet(&sim, &c, 8, RouterKind::Prefix);
    let naive = fleet(&sim, &c, 8, RouterKind::PrefixNaive);
    assert_eq!(safe.report.queue_wait_mean, 0.0);
    let (s, n) = (safe.estimate.unwrap(), naive.estimate.unwrap());
    assert_eq!(s.requests, 600);
    assert_eq!(s.over, 0, "{s:?}");
    // And it knows of the hits: the events describe what the device holds.
    assert!(s.estimated_tokens * 10 >= s.real_tokens * 9, "{s:?}");
    assert!(n.over > 0, "{n:?}");
    assert!(n.mean_over_tokens >= 128.0);
    // Crediting stored blocks past the resume point moves requests (at 1, to where the naive
    // router sends them) without moving the estimate off the resume point.
    assert_ne!(safe.per_instance, naive.per_instance);
    for credit in [0.5, 1.0] {
        let mut f = FleetConfig::new(8, RouterKind::Prefix);
        f.stored_credit = credit;
        let r = sim.run_fleet(&c, &f, "credit", &mut |_, _| true).unwrap();
        let e = r.estimate.unwrap();
        assert_eq!(e.over, 0, "credit {credit}: {e:?}");
        assert!(e.estimated_tokens * 10 >= e.real_tokens * 9, "{e:?}");
        if credit == 1.0 {
            assert_eq!(r.per_instance, naive.per_instance);
            assert_eq!(r.report.hit_tokens, naive.report.hit_tokens);
        }
    }
}

#[test]
fn a_tie_seed_moves_only_the_scoring_routers_and_replays_the_same() {
    let sim = Simulator::new(mimo(), Arc::new(conversation(300)), 128).unwrap();
    let c = cfg(16 << 30, vec![]);
    let run = |router, seed| {
        let mut f = FleetConfig::new(8, router);
        f.tie_seed = seed;
        sim.run_fleet(&c, &f, "ties", &mut |_, _| true).unwrap()
    };
    let rr = run(RouterKind::RoundRobin, None);
    assert_eq!(
        run(RouterKind::RoundRobin, Some(3)).per_instance,
        rr.per_instance
    );
    let a = run(RouterKind::LeastLoaded, Some(3));
    assert_eq!(
        run(RouterKind::LeastLoaded, Some(3)).per_instance,
        a.per_instance
    );
    assert_ne!(
        run(RouterKind::LeastLoaded, None).per_instance,
        a.per_instance
    );
}

#[test]
fn under_dense_caching_both_prefix_routers_agree() {
    // Every cached block is a resume point when every group keeps every token.
    let sim = Simulator::new(mimo(), Arc::new(conversation(300)), 128).unwrap();
    let mut c = cfg(64 << 30, vec![]);
    c.policy = Policy::Dense;
    let safe = fleet(&sim, &c, 4, RouterKind::Prefix);
    let naive = fleet(&sim, &c, 4, RouterKind::PrefixNaive);
    assert_eq!(safe.report.hit_tokens, naive.report.hit_tokens);
    assert_eq!(safe.estimate, naive.estimate);
}

#[test]
fn bad_fleets_are_errors() {
    let sim = Simulator::new(mimo(), Arc::new(conversation(10)), 128).unwrap();
    let c = cfg(16 << 30, vec![]);
    for n in [0, 4097] {
        let e = sim
            .run_fleet(
                &c,
                &FleetConfig::new(n, RouterKind::RoundRobin),
                "x",
                &mut |_, _| true,
            )
            .unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument { what, .. } if what == "instances"),
            "{e:?}"
        );
    }
    let e = RouterKind::parse("nearest").unwrap_err();
    assert!(e.to_string().contains("prefix-naive"), "{e}");
    let mut f = FleetConfig::new(2, RouterKind::Prefix);
    f.overlap_weight = f64::NAN;
    assert!(sim.run_fleet(&c, &f, "x", &mut |_, _| true).is_err());
    for credit in [-0.5, f64::INFINITY] {
        let mut f = FleetConfig::new(2, RouterKind::Prefix);
        f.stored_credit = credit;
        let e = sim.run_fleet(&c, &f, "x", &mut |_, _| true).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument { what, .. } if what == "stored_credit"),
            "{e:?}"
        );
    }
    let mut oracle = c.clone();
    oracle.eviction = Eviction::Oracle;
    let f = FleetConfig::new(2, RouterKind::RoundRobin);
    assert!(sim.run_fleet(&oracle, &f, "x", &mut |_, _| true).is_err());
}
