//! Adapters by name. Requests carry an `Arc` of the adapter they resolved, so unloading or
//! replacing a name never disturbs requests in flight, and the cache keys on the adapter's
//! content digest, so new weights under an old name never hit the old blocks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use alora_model::{LoraAdapter, ModelError};
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
            |e| {
                // Name the adapter, not the server's absolute paths.
                let why = match e {
                    ModelError::Adapter { msg, .. } => msg,
                    ModelError::Io { source, .. } => format!("cannot read its files ({source})"),
                    e => e.to_string(),
                };
                ApiError::invalid("lora_path", format!("adapter `{name}`: {why}"))
                    .with_code("adapter_load_failed")
            },
        )?;
        let a = Arc::new(a);
        self.adapters.insert(name.to_string(), a.clone());
        Ok(a)
    }

    /// Registers (or replaces) an adapter built in process under its own name.
    pub fn insert(&self, adapter: Arc<LoraAdapter>) {
        self.adapters.insert(adapter.name.clone(), adapter);
    }

    pub fn unload(&self, name: &str) -> bool {
        self.adapters.remove(name).is_some()
    }
}

/// The files of a PEFT adapter directory.
pub const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Resolves adapter directory `path` inside `root`, refusing anything that escapes it: the
/// directory and each of its files by resolved path (a symlink inside pointing outside is
/// refused), and each file must be a regular file (a FIFO would hang the load). Errors name
/// `path` as given and never say whether something outside `root` exists.
pub fn confine(root: &Path, path: &str) -> Result<PathBuf, ApiError> {
    let root = root
        .canonicalize()
        .map_err(|e| ApiError::internal(format!("adapter directory unavailable: {}", e.kind())))?;
    let refused = || {
        ApiError::invalid(
            "lora_path",
            format!("`{path}` is not an adapter directory inside the adapter directory"),
        )
    };
    let candidate = if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        root.join(path)
    };
    let resolved = candidate.canonicalize().map_err(|_| refused())?;
    if !resolved.starts_with(&root) || !resolved.is_dir() {
        return Err(refused());
    }
    for f in ADAPTER_FILES {
        let file = resolved
            .join(f)
            .canonicalize()
            .map_err(|_| ApiError::invalid("lora_path", format!("`{path}` has no `{f}`")))?;
        if !file.starts_with(&root) {
            return Err(ApiError::invalid(
                "lora_path",
                format!("`{path}/{f}` leads outside the adapter directory"),
            ));
        }
        if !std::fs::metadata(&file).is_ok_and(|m| m.is_file()) {
            return Err(ApiError::invalid(
                "lora_path",
                format!("`{path}/{f}` is not a regular file"),
            ));
        }
    }
    Ok(resolved)
}
