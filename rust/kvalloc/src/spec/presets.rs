//! The bundled model presets (configs under `rust/kvalloc/presets/`).

use super::ModelSpec;
use crate::error::{Error, Result};

/// Bundled presets: (name, config JSON). Order is the order [`ModelSpec::presets`] lists.
const PRESETS: &[(&str, &str)] = &[
    (
        "mimo-v2.5-pro",
        include_str!("../../presets/mimo-v2.5-pro.json"),
    ),
    (
        "mimo-v2-flash",
        include_str!("../../presets/mimo-v2-flash.json"),
    ),
    (
        "gemma-3-27b",
        include_str!("../../presets/gemma-3-27b-it.json"),
    ),
    (
        "gpt-oss-120b",
        include_str!("../../presets/gpt-oss-120b.json"),
    ),
];

const PRESET_NAMES: &[&str] = &[
    "mimo-v2.5-pro",
    "mimo-v2-flash",
    "gemma-3-27b",
    "gpt-oss-120b",
];

impl ModelSpec {
    /// A bundled model (names in [`ModelSpec::presets`], matched case-insensitively); its
    /// `name` is the preset name.
    pub fn preset(name: &str) -> Result<ModelSpec> {
        let wanted = name.trim().to_ascii_lowercase();
        let (preset_name, json) = PRESETS.iter().find(|(n, _)| *n == wanted).ok_or_else(|| {
            Error::invalid(
                "name",
                format!(
                    "unknown preset '{name}'; known presets: {}",
                    PRESET_NAMES.join(", ")
                ),
            )
        })?;
        let mut spec = ModelSpec::from_hf_config_str(json, None)?;
        spec.name = (*preset_name).to_string();
        Ok(spec)
    }

    /// Names [`ModelSpec::preset`] accepts.
    pub fn presets() -> &'static [&'static str] {
        PRESET_NAMES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_all_load_with_their_names() {
        for &name in ModelSpec::presets() {
            let spec = ModelSpec::preset(name).unwrap();
            assert_eq!(spec.name, name);
        }
        let err = ModelSpec::preset("llama-7b").unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { ref what, .. } if what == "name"));
        assert!(err.to_string().contains("gemma-3-27b"), "{err}");
    }
}
