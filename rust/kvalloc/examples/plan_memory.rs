//! kvalloc from plain Rust, no Python: read a model's KV geometry, see what SWA-aware holding
//! saves, and carve one memory budget into per-group blocks that flow between groups.
//!
//! ```text
//! cargo run --example plan_memory                       # mimo-v2.5-pro, 8 GiB
//! cargo run --example plan_memory -- gemma-3-27b 16     # another preset, 16 GiB
//! cargo run --example plan_memory -- path/to/config.json
//! ```

use std::path::Path;

use kvalloc::{ModelSpec, SlabArena};

fn main() -> Result<(), kvalloc::Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args.first().map(String::as_str).unwrap_or("mimo-v2.5-pro");
    let gib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(8);
    let spec = if model.ends_with(".json") {
        ModelSpec::from_hf_config_path(Path::new(model), None)?
    } else {
        ModelSpec::preset(model)?
    };
    let block_tokens = 16;

    println!(
        "{} ({} layers, {})",
        spec.name,
        spec.num_layers,
        spec.dtype.name()
    );
    for (i, g) in spec.groups.iter().enumerate() {
        println!(
            "  group {i}: {:<7} window {:>5}  {:>2} layers  {:>9} B/token  block {:>10} B",
            g.kind.name(),
            g.window.map_or("-".to_string(), |w| w.to_string()),
            g.layers.len(),
            g.bytes_per_token(),
            g.block_bytes(block_tokens)
        );
    }

    // How many 32K-token sequences fit in the budget under each holding?
    let budget = gib << 30;
    let ctx = 32 * 1024;
    let swa = spec.kv_bytes(ctx, block_tokens)?;
    let dense = spec.kv_bytes_dense(ctx)?;
    println!(
        "\n{gib} GiB holds {} sequences of 32K tokens SWA-aware ({} MiB each) vs {} dense ({} MiB each)",
        budget / swa,
        swa >> 20,
        budget / dense,
        dense >> 20
    );

    // The same budget as a slab arena, one class per group. Fill it with running sequences:
    // each needs every full block, but only a window's worth of sliding blocks.
    let classes = spec.block_bytes(block_tokens);
    let mut arena = SlabArena::new(budget, &classes, None)?;
    let full_blocks = ctx.div_ceil(u64::from(block_tokens));
    let mut held = Vec::new();
    let mut sequences = 0;
    loop {
        let need: Vec<(usize, u64)> = spec
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| match g.window {
                None => (i, full_blocks),
                Some(w) => (i, u64::from(w).div_ceil(u64::from(block_tokens)) + 1),
            })
            .collect();
        if !arena.can_alloc_all(&need)? {
            break;
        }
        for (class, n) in need {
            held.extend(arena.alloc(class, n as usize)?);
        }
        sequences += 1;
    }
    let st = arena.stats();
    println!(
        "arena: slab {} B, {} slabs; {sequences} running sequences fit; padding waste {} B",
        st.slab_bytes, st.num_slabs, st.padding_waste_bytes
    );
    for (i, c) in st.classes.iter().enumerate() {
        println!(
            "  class {i}: {} blocks in {} slabs",
            c.blocks_in_use, c.slabs_held
        );
    }

    // Everything goes back; every slab is free to serve any class again.
    arena.free(&held)?;
    arena.validate()?;
    assert_eq!(arena.stats().slabs_free, arena.stats().num_slabs);
    Ok(())
}
