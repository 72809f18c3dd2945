//! Named float tensors: where the exporter reads weights from.

use std::collections::HashMap;
use std::path::Path;


use crate::error::FormatError;
use crate::files::sha256_hex;

/// A dense f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

impl TensorData {
    /// A tensor, checking that the data fills the shape.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, FormatError> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(FormatError::Invalid {
                what: "tensor".into(),
                detail: format!("shape {shape:?} needs {n} values, got {}", data.len()),
            });
        }
        Ok(TensorData { shape, data })
    }
}

/// Something that hands out weights by name.
pub trait TensorSource {
    /// The tensor called `name`.
    fn tensor(&self, name: &str) -> Result<TensorData, FormatError>;

    /// The tensor called `name`, checked against `shape`.
    fn tensor_shaped(&self, name: &str, shape: &[usize]) -> Result<TensorData, FormatError> {
        let t = self.tensor(name)?;
        if t.shape != shape {
            return Err(FormatError::TensorShape { name: name.into(), expected: shape.to_vec(), found: t.shape });
        }
        Ok(t)
    }
}

impl TensorSource for HashMap<String, TensorData> {
    fn tensor(&self, name: &str) -> Result<TensorData, FormatError> {
        self.get(name).cloned().ok_or_else(|| FormatError::MissingTensor { name: name.into() })
    }
}

/// Several sources searched in order: e.g. trained head tensors first, then
/// the pretrained backbone file.
pub struct Layered<'a>(pub Vec<&'a dyn TensorSource>);

impl TensorSource for Layered<'_> {
    fn tensor(&self, name: &str) -> Result<TensorData, FormatError> {
        for s in &self.0 {
            match s.tensor(name) {
                Err(FormatError::MissingTensor { .. }) => continue,
                other => return other,
            }
        }
        Err(FormatError::MissingTensor { name: name.into() })
    }
}

/// A safetensors file held in memory, with its sha256.
pub struct SafeTensorsFile {
    bytes: Vec<u8>,
    /// Offset of the data section.
    data_start: usize,
    index: HashMap<String, safetensors::tensor::TensorInfo>,
    sha256: String,
}

/// Largest weights file accepted (2 GiB).
pub const MAX_WEIGHTS_BYTES: u64 = 2 << 30;

impl SafeTensorsFile {
    /// Reads and parses `path`, keeping the bytes.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let len = std::fs::metadata(path).map_err(|e| FormatError::io(path, e))?.len();
        if len > MAX_WEIGHTS_BYTES {
            return Err(FormatError::TooLarge { what: path.display().to_string(), size: len, limit: MAX_WEIGHTS_BYTES });
        }
        let bytes = std::fs::read(path).map_err(|e| FormatError::io(path, e))?;
        Self::from_bytes(bytes).map_err(|e| match e {
            FormatError::SafeTensors(d) => FormatError::SafeTensors(format!("{}: {d}", path.display())),
            other => other,
        })
    }

    /// Parses a safetensors file already in memory. The header is parsed
    /// (and every tensor's offsets checked) once, here.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, FormatError> {
        // `deserialize` validates offsets against the buffer length.
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| FormatError::SafeTensors(e.to_string()))?;
        let (header_len, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| FormatError::SafeTensors(e.to_string()))?;
        let index = meta.tensors().into_iter().map(|(n, info)| (n, info.clone())).collect();
        let sha256 = sha256_hex(&bytes);
        Ok(SafeTensorsFile { bytes, data_start: 8 + header_len, index, sha256 })
    }

    /// sha256 (hex) of the file.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The names of every tensor in the file.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }
}

impl TensorSource for SafeTensorsFile {
    fn tensor(&self, name: &str) -> Result<TensorData, FormatError> {
        let info = self.index.get(name).ok_or_else(|| FormatError::MissingTensor { name: name.into() })?;
        if info.dtype != safetensors::Dtype::F32 {
            return Err(FormatError::SafeTensors(format!("tensor `{name}` is {:?}, expected F32", info.dtype)));
        }
        let (a, b) = info.data_offsets;
        // Offsets were validated against the buffer in `from_bytes`.
        let raw = self
            .bytes
            .get(self.data_start + a..self.data_start + b)
            .ok_or_else(|| FormatError::SafeTensors(format!("tensor `{name}` lies outside the file")))?;
        let data = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        TensorData::new(info.shape.clone(), data)
    }
}

/// Writes named tensors as a safetensors file, atomically.
pub fn write_safetensors(path: &Path, tensors: &HashMap<String, TensorData>) -> Result<(), FormatError> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = names
        .iter()
        .map(|n| {
            let t = &tensors[*n];
            ((*n).clone(), t.data.iter().flat_map(|v| v.to_le_bytes()).collect(), t.shape.clone())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, b, s)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| FormatError::SafeTensors(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let out = safetensors::serialize(views, None).map_err(|e| FormatError::SafeTensors(e.to_string()))?;
    crate::files::write_atomic(path, &out)
}
