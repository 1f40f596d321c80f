//! Reads `model.safetensors` or a sharded `model.safetensors.index.json`
//! through a memory map, moving each tensor straight to the target device
//! and dtype, so at most one tensor's host copy exists at a time.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use tch::{Device, Kind, Tensor};

/// Named weights, already on the target device in the target dtype.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    /// Loads every tensor of the checkpoint in `dir`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self, String> {
        let mut tensors = HashMap::new();
        for file in shard_files(dir)? {
            let handle =
                std::fs::File::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            // SAFETY: the checkpoint is opened read-only and not expected to be
            // modified while the server loads it; the map is dropped below.
            let mmap = unsafe { memmap2::Mmap::map(&handle) }
                .map_err(|e| format!("{}: {e}", file.display()))?;
            let st =
                SafeTensors::deserialize(&mmap).map_err(|e| format!("{}: {e}", file.display()))?;
            for (name, view) in st.tensors() {
                let host: Tensor = view
                    .try_into()
                    .map_err(|e| format!("{}: {name}: {e}", file.display()))?;
                let moved = host
                    .f_to_device(device)
                    .and_then(|t| t.f_to_kind(kind))
                    .map_err(|e| format!("{name}: moving to {device:?}: {e}"))?;
                tensors.insert(name, moved);
            }
        }
        Ok(Self { tensors })
    }

    /// Takes the weight out of the set (so unused ones can be reported).
    pub fn take(&mut self, name: &str) -> Result<Tensor, String> {
        self.tensors
            .remove(name)
            .ok_or_else(|| format!("the checkpoint has no tensor {name:?}"))
    }

    /// Takes the weight if present.
    pub fn take_optional(&mut self, name: &str) -> Option<Tensor> {
        self.tensors.remove(name)
    }

    /// Names left untaken.
    pub fn remaining(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

/// The safetensors files of a checkpoint: the index's shards, or the single file.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text =
            std::fs::read_to_string(&index).map_err(|e| format!("{}: {e}", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format!("{}: no weight_map object", index.display()))?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        Ok(vec![single])
    } else {
        Err(format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        ))
    }
}
