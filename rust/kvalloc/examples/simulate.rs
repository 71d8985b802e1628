//! Replays a trace through the manager under both policies and prints what each achieved.
//!
//! ```bash
//! cargo run --release --example simulate                          # Mooncake conversation trace, 1 TiB
//! cargo run --release --example simulate -- trace.jsonl 512 64 lru    # trace, device GiB, block tokens, eviction
//! cargo run --release --example simulate -- gen:chat 64              # a generated workload (chat, agent, shared-prompt)
//! ```

use std::path::PathBuf;

use kvalloc::sim::{generate, readers, RunConfig, Simulator};
use kvalloc::{Eviction, ModelSpec, Policy};

fn main() -> Result<(), kvalloc::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().map_or_else(
        || PathBuf::from("python/kvalloc/data/mooncake_conversation.jsonl"),
        PathBuf::from,
    );
    let gib: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1024.0);
    let block_tokens: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(128);
    let eviction = Eviction::parse(args.get(3).map_or("value", String::as_str))?;
    let trace = match path.to_str().and_then(|p| p.strip_prefix("gen:")) {
        Some(kind) => generate::generate(kind, 0, None)?,
        None => readers::read_trace(&path, readers::ReadOptions::default())?,
    };
    let sim = Simulator::new(
        ModelSpec::preset("mimo-v2.5-pro")?,
        trace.into(),
        block_tokens,
    )?;
    println!(
        "{}: {} requests, upper bound {:.2}% at {block_tokens}-token blocks, device {gib} GiB",
        sim.trace().name,
        sim.trace().requests.len(),
        100.0 * sim.upper_bound().hit_rate()
    );
    for policy in [Policy::SwaAware, Policy::Dense] {
        let cfg = RunConfig {
            policy,
            eviction,
            device_bytes: (gib * (1u64 << 30) as f64) as u64,
            lower_tiers: vec![],
            service: Default::default(),
            overlap: Default::default(),
            load_policy: Default::default(),
        };
        let r = sim.run(&cfg, policy.name(), &mut |_, _| true)?;
        println!(
            "{:>9}: hit {:.2}% ({:.1}% of bound), {:.0} cached tokens/GiB, TTFT {:.2}s (no cache {:.2}s), \
             wait {:.2}s, peak running {}, preempted {}, rejected {}, {:.2}s wall",
            policy.name(),
            100.0 * r.hit_rate(),
            100.0 * r.hit_rate() / r.upper_bound_hit_rate(),
            r.cached_tokens_per_gib(),
            r.ttft_mean,
            r.ttft_no_cache_mean,
            r.queue_wait_mean,
            r.peak_running,
            r.preemptions,
            r.rejected,
            r.wall_seconds
        );
    }
    Ok(())
}
