use super::{CheckpointKind, Layout, PrefixTree, NONE};
use crate::eviction::Eviction;
use std::collections::HashMap;

/// A path of five nodes over a full group and two sliding groups (windows of `window`
/// one-token blocks): A holds an SWA block at every node, B only at the last two.
fn five_node_path(window: u32) -> (PrefixTree, Vec<u32>) {
    let layout = Layout {
        windows: vec![None, Some(window), Some(window)],
        block_bytes: vec![1, 1, 1],
        block_tokens: 1,
        swa_aware: true,
    };
    let mut tree = PrefixTree::new(layout, Eviction::Value);
    let (mut parent, mut path) = (NONE, Vec::new());
    for depth in 0..5u64 {
        let b = if depth >= 3 { 100 + depth } else { 0 };
        parent = tree.insert(
            (depth + 1) * 7919,
            parent,
            depth as u32,
            &[10 + depth, 50 + depth, b],
        );
        path.push(parent);
    }
    (tree, path)
}

/// A checkpoint that one sliding group cannot cover is refused and leaves no reference
/// behind, in the group whose run was counted first as in the short one.
#[test]
fn a_refused_checkpoint_takes_back_every_reference() {
    let (mut tree, path) = five_node_path(4);
    let pins: HashMap<_, _> = path.iter().map(|&n| (n, 1)).collect();
    // B's run (2 blocks) is short of the 4 a resume at depth 5 needs.
    assert!(!tree.add_checkpoint(path[4], &[4, 4], CheckpointKind::PromptEnd));
    tree.validate(&pins).unwrap();
    assert!(path
        .iter()
        .all(|&n| !tree.ckpt_covered(n, 1) && !tree.ckpt_covered(n, 2)));
    assert!(!tree.is_checkpoint(path[4]));
    // With windows of two blocks both runs suffice: registered, A's run capped at 3.
    let (mut tree, path) = five_node_path(2);
    assert!(tree.add_checkpoint(path[4], &[3, 3], CheckpointKind::PromptEnd));
    tree.validate(&pins).unwrap();
    let covered = |g| path.iter().filter(|&&n| tree.ckpt_covered(n, g)).count();
    assert_eq!((covered(1), covered(2)), (3, 2));
}

#[test]
fn window_blocks_is_the_capped_ceiling_for_every_block_size() {
    for block_tokens in [1u32, 2, 3, 7, 16, 48, 64, 528] {
        let layout = Layout {
            windows: vec![None],
            block_bytes: vec![1],
            block_tokens,
            swa_aware: true,
        };
        for w in (1..300).chain([4095, 4096, 4097, u32::MAX / 2]) {
            for k in [0, 1, 5, 1000, u32::MAX] {
                assert_eq!(
                    layout.window_blocks(k, w),
                    k.min(w.div_ceil(block_tokens)),
                    "B = {block_tokens}, w = {w}, k = {k}"
                );
            }
        }
    }
}
