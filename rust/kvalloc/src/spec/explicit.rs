//! Specs built from an explicit list of groups: for engines that decide the grouping
//! themselves (vLLM splits one attention kind into several groups of equal layer counts, so
//! that every group's page has the same bytes), where reading the model's config would group
//! the layers differently.

use super::{hf::check_token_bytes, AttentionKind, KVGroup, ModelSpec, MAX_GROUPS};
use crate::error::{Error, Result};

impl ModelSpec {
    /// A spec with exactly these groups (reordered as every spec is: full groups first, then
    /// sliding ones, each by first layer). A [`Error::Config`] names the group and field when a
    /// group is empty, lists a layer twice or a layer another group has, gives a sliding group
    /// no positive window (or a full one a window), has a zero head count or K dim, or when
    /// the groups' dtypes differ. `num_layers` is the model's layer count (None: one past the
    /// highest layer listed).
    pub fn from_groups(
        name: &str,
        mut groups: Vec<KVGroup>,
        num_layers: Option<u32>,
        model_id: Option<String>,
    ) -> Result<ModelSpec> {
        if groups.is_empty() || groups.len() > MAX_GROUPS {
            return Err(Error::config(
                "groups",
                format!(
                    "{} groups; between 1 and {MAX_GROUPS} are supported",
                    groups.len()
                ),
            ));
        }
        let dtype = groups[0].dtype;
        let mut seen = std::collections::BTreeSet::new();
        for (i, g) in groups.iter_mut().enumerate() {
            let field = |f: &str| format!("groups[{i}].{f}");
            if g.layers.is_empty() {
                return Err(Error::config(field("layers"), "is empty"));
            }
            g.layers.sort_unstable();
            for &l in &g.layers {
                if !seen.insert(l) {
                    return Err(Error::config(
                        field("layers"),
                        format!("layer {l} is listed twice (in this group or another)"),
                    ));
                }
            }
            match (g.kind, g.window) {
                (AttentionKind::Sliding, Some(w)) if w > 0 => {}
                (AttentionKind::Sliding, _) => {
                    return Err(Error::config(
                        field("window"),
                        "a sliding group needs a positive window",
                    ))
                }
                (AttentionKind::Full, Some(_)) => {
                    return Err(Error::config(
                        field("window"),
                        "a full-attention group has no window",
                    ))
                }
                (AttentionKind::Full, None) => {}
            }
            if g.kv_heads == 0 || g.k_dim == 0 {
                return Err(Error::config(
                    field("kv_heads"),
                    "heads and K dim must be positive",
                ));
            }
            if g.dtype != dtype {
                return Err(Error::config(
                    field("dtype"),
                    format!(
                        "is {}, group 0's is {}: one dtype per model",
                        g.dtype.name(),
                        dtype.name()
                    ),
                ));
            }
        }
        check_token_bytes(&groups)?;
        let highest = *seen.iter().next_back().expect("a group has a layer");
        let num_layers = match num_layers {
            Some(n) if n > highest => n,
            Some(n) => {
                return Err(Error::config(
                    "num_layers",
                    format!("{n} layers, but layer {highest} is listed"),
                ))
            }
            None => highest + 1,
        };
        groups.sort_by_key(|g| (g.kind.code(), g.layers[0]));
        Ok(ModelSpec {
            name: name.to_string(),
            num_layers,
            dtype,
            groups,
            model_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::DType;

    fn group(kind: AttentionKind, window: Option<u32>, layers: &[u32]) -> KVGroup {
        KVGroup {
            kind,
            window,
            layers: layers.to_vec(),
            kv_heads: 1,
            k_dim: 64,
            v_dim: 64,
            dtype: DType::Bf16,
        }
    }

    #[test]
    fn two_sliding_groups_with_one_window_stay_apart_and_sort_after_full() {
        let spec = ModelSpec::from_groups(
            "gemma3-vllm",
            vec![
                group(AttentionKind::Sliding, Some(32), &[0, 3]),
                group(AttentionKind::Full, None, &[5, 2]),
                group(AttentionKind::Sliding, Some(32), &[1, 4]),
            ],
            None,
            None,
        )
        .unwrap();
        assert_eq!(spec.num_layers, 6);
        let layers: Vec<_> = spec.groups.iter().map(|g| g.layers.clone()).collect();
        assert_eq!(layers, vec![vec![2, 5], vec![0, 3], vec![1, 4]]);
        let bytes = spec.block_bytes(32);
        assert!(bytes.iter().all(|&b| b == bytes[0]));
    }

    #[test]
    fn bad_groups_are_config_errors_naming_the_field() {
        let cases = [
            (vec![], "groups"),
            (
                vec![group(AttentionKind::Full, None, &[])],
                "groups[0].layers",
            ),
            (
                vec![
                    group(AttentionKind::Full, None, &[0]),
                    group(AttentionKind::Full, None, &[0]),
                ],
                "groups[1].layers",
            ),
            (
                vec![group(AttentionKind::Sliding, None, &[0])],
                "groups[0].window",
            ),
            (
                vec![group(AttentionKind::Sliding, Some(0), &[0])],
                "groups[0].window",
            ),
            (
                vec![group(AttentionKind::Full, Some(8), &[0])],
                "groups[0].window",
            ),
        ];
        for (groups, field) in cases {
            match ModelSpec::from_groups("x", groups, None, None) {
                Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected a config error on {field}, got {other:?}"),
            }
        }
        let mut f32_group = group(AttentionKind::Full, None, &[1]);
        f32_group.dtype = DType::F32;
        let mixed = vec![group(AttentionKind::Full, None, &[0]), f32_group];
        assert!(ModelSpec::from_groups("x", mixed, None, None).is_err());
        let short = ModelSpec::from_groups(
            "x",
            vec![group(AttentionKind::Full, None, &[4])],
            Some(4),
            None,
        );
        assert!(short.is_err());
    }
}
