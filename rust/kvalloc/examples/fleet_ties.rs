//! The prefix-aware routers on the Mooncake conversation trace (mimo-v2.5-pro, swa-aware, 64 GiB
//! of device per instance, no lower tier), each replayed with the default rotating tie-break and
//! under a few tie-breaking seeds: how much of a hit-rate difference between routers is the
//! routers' and how much is tie-breaking.
//!
//! ```bash
//! cargo run --release --example fleet_ties                      # N = 4, 16, 64; 8 seeds; credits 0, 0.5
//! cargo run --release --example fleet_ties -- 4,16 12 0,0.25,1 4  # instances, seeds, window-safe stored credits, overlap weight
//! ```

use std::path::Path;

use kvalloc::sim::{readers, FleetConfig, RouterKind, RunConfig, Simulator};
use kvalloc::{Eviction, ModelSpec, Policy};

fn list<T: std::str::FromStr>(arg: Option<&String>, default: &str) -> Vec<T> {
    let s = arg.map_or(default, String::as_str);
    s.split(',').filter_map(|x| x.parse().ok()).collect()
}

fn main() -> Result<(), kvalloc::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let counts: Vec<u32> = list(args.first(), "4,16,64");
    let seeds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(8);
    let credits: Vec<f64> = list(args.get(2), "0,0.5");
    let weight: f64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python/kvalloc/data/mooncake_conversation.jsonl");
    let trace = readers::read_trace(&path, readers::ReadOptions::default())?;
    let sim = Simulator::new(ModelSpec::preset("mimo-v2.5-pro")?, trace.into(), 128)?;
    let cfg = RunConfig {
        policy: Policy::SwaAware,
        eviction: Eviction::Value,
        device_bytes: 64 << 30,
        lower_tiers: vec![],
        service: Default::default(),
        overlap: Default::default(),
        load_policy: Default::default(),
    };
    let mut routers = vec![("prefix-naive".to_string(), RouterKind::PrefixNaive, 0.0)];
    for &c in &credits {
        routers.push((format!("prefix, credit {c}"), RouterKind::Prefix, c));
    }
    let t0 = std::time::Instant::now();
    println!("router | N | hit, rotating ties | mean over {seeds} seeds [min - max] | over-estimated requests (rotating)");
    for &n in &counts {
        for (name, kind, credit) in &routers {
            let run = |seed: Option<u64>| -> Result<(f64, u64), kvalloc::Error> {
                let mut f = FleetConfig::new(n, *kind);
                f.stored_credit = *credit;
                f.overlap_weight = weight;
                f.tie_seed = seed;
                let r = sim.run_fleet(&cfg, &f, name, &mut |_, _| true)?;
                Ok((
                    100.0 * r.report.hit_rate(),
                    r.estimate.map_or(0, |e| e.over),
                ))
            };
            let (hit, over) = run(None)?;
            let hits = (1..=seeds)
                .map(|s| run(Some(s)).map(|x| x.0))
                .collect::<Result<Vec<_>, _>>()?;
            let mean = hits.iter().sum::<f64>() / hits.len().max(1) as f64;
            let lo = hits.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = hits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            println!("{name} | {n} | {hit:.2}% | {mean:.2}% [{lo:.2} - {hi:.2}] | {over}");
        }
    }
    println!("{:.0} s wall", t0.elapsed().as_secs_f64());
    Ok(())
}
