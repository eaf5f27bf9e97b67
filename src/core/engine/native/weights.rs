//! Reading a checkpoint's tensors: `model.safetensors` or the shards named by `model.safetensors.index.json`,
//! memory-mapped, in bf16, f16 or f32. Matrices keep bf16 as bf16 (half the bytes to stream per decode step);
//! f16 and everything else becomes f32.
use half::bf16;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{origin}: not a valid safetensors file: {detail}")]
    Format { origin: String, detail: String },
    #[error(
        "{dir}: no model.safetensors or model.safetensors.index.json; the built-in engine reads safetensors weights only"
    )]
    NoWeights { dir: PathBuf },
    #[error("the checkpoint has no tensor `{name}`")]
    Missing { name: String },
    #[error("tensor `{name}` has shape {actual:?}, but config.json implies {expected:?}")]
    Shape { name: String, expected: Vec<usize>, actual: Vec<usize> },
    #[error("cannot place the weights on the device: {0}")]
    Device(#[from] super::backend::BackendError),
    #[error("tensor `{name}` is {dtype:?}; supported: bf16, f16, f32")]
    Dtype { name: String, dtype: Dtype },
}

#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl HostData {
    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn byte_len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len() * 4,
            HostData::Bf16(v) => v.len() * 2,
        }
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostData::F32(v) => v.clone(),
            HostData::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

enum Bytes {
    Mapped(Mmap),
    Static(&'static [u8]),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Static(s) => s,
        }
    }
}

pub struct WeightFiles {
    files: Vec<(String, Bytes)>,
    /// Tensor name → index into `files`.
    index: HashMap<String, usize>,
}

impl WeightFiles {
    pub fn open(dir: &Path) -> Result<Self, WeightError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| WeightError::Io { path: index_path.clone(), source })?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| WeightError::Format { origin: index_path.display().to_string(), detail: e.to_string() })?;
            let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| WeightError::Format {
                origin: index_path.display().to_string(),
                detail: "no `weight_map` object".into(),
            })?;
            let mut shards: Vec<PathBuf> = map.values().filter_map(|v| v.as_str()).map(|f| dir.join(f)).collect();
            shards.sort();
            shards.dedup();
            shards
        } else {
            return Err(WeightError::NoWeights { dir: dir.to_path_buf() });
        };
        let mut files = Vec::new();
        for path in names {
            let file = std::fs::File::open(&path).map_err(|source| WeightError::Io { path: path.clone(), source })?;
            // SAFETY: the checkpoint is read-only input; like every inference server we assume nobody
            // truncates it while it is mapped.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| WeightError::Io { path: path.clone(), source })?;
            files.push((path.display().to_string(), Bytes::Mapped(map)));
        }
        Self::index(files)
    }

    /// Weights compiled into the binary.
    pub fn from_static(origin: &str, bytes: &'static [u8]) -> Result<Self, WeightError> {
        Self::index(vec![(origin.to_string(), Bytes::Static(bytes))])
    }

    fn index(files: Vec<(String, Bytes)>) -> Result<Self, WeightError> {
        let mut index = HashMap::new();
        for (at, (origin, bytes)) in files.iter().enumerate() {
            let tensors = SafeTensors::deserialize(bytes.as_slice())
                .map_err(|e| WeightError::Format { origin: origin.clone(), detail: e.to_string() })?;
            for name in tensors.names() {
                index.insert(name.to_string(), at);
            }
        }
        Ok(Self { files, index })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Reads a tensor and checks its shape; bf16 stays bf16 when `keep_bf16`.
    pub fn read(&self, name: &str, shape: &[usize], keep_bf16: bool) -> Result<HostTensor, WeightError> {
        let missing = || WeightError::Missing { name: name.to_string() };
        let (origin, bytes) = &self.files[*self.index.get(name).ok_or_else(missing)?];
        let tensors = SafeTensors::deserialize(bytes.as_slice())
            .map_err(|e| WeightError::Format { origin: origin.clone(), detail: e.to_string() })?;
        let view = tensors.tensor(name).map_err(|_| missing())?;
        if view.shape() != shape {
            return Err(WeightError::Shape {
                name: name.into(),
                expected: shape.to_vec(),
                actual: view.shape().to_vec(),
            });
        }
        let raw = view.data();
        let data = match view.dtype() {
            Dtype::F32 => {
                HostData::F32(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            }
            Dtype::BF16 => {
                let values = raw.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]));
                if keep_bf16 {
                    HostData::Bf16(values.collect())
                } else {
                    HostData::F32(values.map(bf16::to_f32).collect())
                }
            }
            Dtype::F16 => {
                HostData::F32(raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect())
            }
            dtype => return Err(WeightError::Dtype { name: name.into(), dtype }),
        };
        Ok(HostTensor { shape: shape.to_vec(), data })
    }
}
