//! Adapters by name. Requests carry an `Arc` of the adapter they resolved, so unloading or
//! replacing a name never disturbs requests in flight, and the cache keys on the adapter's
//! content digest, so new weights under an old name never hit the old blocks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use alora_model::LoraAdapter;
use dashmap::DashMap;

use crate::engine::ModelInfo;
use crate::error::ApiError;

#[derive(Default)]
pub struct AdapterRegistry {
    adapters: DashMap<String, Arc<LoraAdapter>>,
}

impl AdapterRegistry {
    pub fn get(&self, name: &str) -> Option<Arc<LoraAdapter>> {
        self.adapters.get(name).map(|a| a.clone())
    }

    /// All adapters, sorted by name.
    pub fn list(&self) -> Vec<Arc<LoraAdapter>> {
        let mut v: Vec<_> = self.adapters.iter().map(|e| e.value().clone()).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Loads (or replaces) `name` from `dir`. Blocking: call from a blocking context.
    pub fn load(
        &self,
        name: &str,
        dir: &Path,
        info: &ModelInfo,
    ) -> Result<Arc<LoraAdapter>, ApiError> {
        let tok = info.tokenizer.clone();
        let encode = move |s: &str| tok.encode(s);
        let a = LoraAdapter::load(name, dir, &info.config, &info.device, Some(&encode)).map_err(
            |e| ApiError::invalid("lora_path", e.to_string()).with_code("adapter_load_failed"),
        )?;
        let a = Arc::new(a);
        self.adapters.insert(name.to_string(), a.clone());
        Ok(a)
    }

    pub fn unload(&self, name: &str) -> bool {
        self.adapters.remove(name).is_some()
    }
}

/// Resolves `path` inside `root`, refusing anything that escapes it.
pub fn confine(root: &Path, path: &str) -> Result<PathBuf, ApiError> {
    let root = root
        .canonicalize()
        .map_err(|e| ApiError::internal(format!("adapter directory unavailable: {e}")))?;
    let candidate = if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        root.join(path)
    };
    let resolved = candidate
        .canonicalize()
        .map_err(|_| ApiError::invalid("lora_path", format!("`{path}` does not exist")))?;
    if !resolved.starts_with(&root) {
        return Err(ApiError::invalid(
            "lora_path",
            format!("`{path}` is outside the adapter directory"),
        ));
    }
    Ok(resolved)
}
