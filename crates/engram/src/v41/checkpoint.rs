//! Checkpoints: one safetensors file, or a folder of shards with `model.safetensors.index.json`
//! (`weight_map`: tensor name -> shard file). Shards are opened (memory-mapped) when a tensor
//! in them is first asked for.

use crate::error::{EngramError, Result};
use crate::tensors::{RawTensor, TensorFile};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The index file of a sharded checkpoint.
pub const INDEX: &str = "model.safetensors.index.json";

/// A checkpoint: one file or a sharded folder.
#[derive(Debug)]
pub struct Checkpoint {
    root: PathBuf,
    /// Tensor name -> shard file name (sharded checkpoints only).
    map: Option<HashMap<String, String>>,
    open: Mutex<HashMap<PathBuf, Arc<TensorFile>>>,
}

impl Checkpoint {
    /// Opens `path`: a `.safetensors` file, or a folder holding `model.safetensors.index.json`
    /// (or exactly one `.safetensors` file).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let root = path.as_ref().to_path_buf();
        let meta = std::fs::metadata(&root).map_err(|e| EngramError::io(&root, e))?;
        if !meta.is_dir() {
            let f = TensorFile::open(&root)?;
            let mut open = HashMap::new();
            open.insert(root.clone(), Arc::new(f));
            return Ok(Checkpoint {
                root,
                map: None,
                open: Mutex::new(open),
            });
        }
        let index = root.join(INDEX);
        if !index.exists() {
            let files: Vec<PathBuf> = std::fs::read_dir(&root)
                .map_err(|e| EngramError::io(&root, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            if let [one] = &files[..] {
                return Self::open(one);
            }
            return Err(EngramError::invalid(
                root.display().to_string(),
                format!("a checkpoint folder with {INDEX} (or a single .safetensors file)"),
                format!("{} .safetensors files and no index", files.len()),
            ));
        }
        let text = crate::files::read_limited_string(&index, 256 << 20, "checkpoint index")?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            EngramError::invalid(index.display().to_string(), "JSON", e.to_string())
        })?;
        if let Some(k) = crate::files::json_duplicate_key(&text) {
            return Err(EngramError::invalid(
                format!("{}: key `{k}`", index.display()),
                "once",
                "twice (JSON would keep the last)",
            ));
        }
        let wm = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                let found = match v.get("weight_map") {
                    None => "no weight_map".to_string(),
                    Some(serde_json::Value::Array(_)) => "a weight_map that is a list".into(),
                    Some(serde_json::Value::String(_)) => "a weight_map that is a string".into(),
                    Some(serde_json::Value::Null) => "a weight_map that is null".into(),
                    Some(_) => "a weight_map that is a number or a boolean".into(),
                };
                EngramError::invalid(
                    index.display().to_string(),
                    "an object with `weight_map` {tensor name: shard file}",
                    found,
                )
            })?;
        let mut map = HashMap::with_capacity(wm.len());
        for (k, f) in wm {
            let f = f
                .as_str()
                .filter(|f| !f.contains('/') && !f.contains(".."))
                .ok_or_else(|| {
                    EngramError::invalid(
                        format!("{} weight_map[{k}]", index.display()),
                        "a shard file name in the checkpoint folder",
                        f.to_string(),
                    )
                })?;
            map.insert(k.clone(), f.to_string());
        }
        Ok(Checkpoint {
            root,
            map: Some(map),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A checkpoint of one already opened file (e.g. made in memory with
    /// [`TensorFile::from_bytes`]).
    pub fn from_file(file: TensorFile) -> Self {
        let root = file.path().to_path_buf();
        let mut open = HashMap::new();
        open.insert(root.clone(), Arc::new(file));
        Checkpoint {
            root,
            map: None,
            open: Mutex::new(open),
        }
    }

    /// Where the checkpoint is.
    pub fn path(&self) -> &Path {
        &self.root
    }

    fn file_for(&self, name: &str) -> Result<Arc<TensorFile>> {
        let path = match &self.map {
            None => self.root.clone(),
            Some(map) => {
                let shard = map.get(name).ok_or_else(|| EngramError::MissingTensor {
                    name: name.to_string(),
                    context: format!(" in {}", self.root.join(INDEX).display()),
                })?;
                self.root.join(shard)
            }
        };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = open.get(&path) {
            return Ok(f.clone());
        }
        let f = Arc::new(TensorFile::open(&path)?);
        open.insert(path, f.clone());
        Ok(f)
    }

    /// A tensor's bytes where they lie (its shard opened if needed); a missing key names the
    /// file or shard that should hold it.
    pub fn raw(&self, name: &str) -> Result<RawTensor> {
        self.file_for(name)?.raw(name)
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        match &self.map {
            Some(m) => m.contains_key(name),
            None => self.file_for(name).is_ok_and(|f| f.contains(name)),
        }
    }
}
