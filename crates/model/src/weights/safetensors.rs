//! HF safetensors: one file or shards listed by `model.safetensors.index.json`, memory-mapped.

use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;

use crate::error::{read_json, ModelError, Result};

/// Maps an HF model directory's safetensors (sharded through the index when present).
pub(super) fn open(dir: &Path) -> Result<MmapedSafetensors> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let idx: Index = read_json(&index)?;
        let mut f: Vec<PathBuf> = idx.weight_map.values().map(|v| dir.join(v)).collect();
        f.sort();
        f.dedup();
        f
    } else {
        vec![dir.join("model.safetensors")]
    };
    for f in &files {
        if !f.exists() {
            return Err(ModelError::Io {
                path: f.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "weights file missing"),
            });
        }
    }
    // SAFETY: the files are mapped read-only; alora does not modify model files while
    // serving, and a concurrent external truncation is outside what any mmap loader guards.
    // The model crate's one `unsafe` (the crate denies `unsafe_code`; compute that needs
    // it lives in `alora-kernels`).
    #[allow(unsafe_code)]
    let st = unsafe { MmapedSafetensors::multi(&files)? };
    Ok(st)
}
