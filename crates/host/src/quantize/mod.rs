//! Post-training int8 quantization of a bundle: calibration on real images
//! and float-vs-int8 evaluation on held-out ones.
//!
//! The bundle's own ONNX graph is run in libtorch by a small interpreter of
//! the operators Tern writes (float: `Conv`, `Clip`, `Add`,
//! `GlobalAveragePool`, `Flatten`, `Gemm`, `Relu`, `Softmax`, `Sigmoid`;
//! int8: `QuantizeLinear`, `DequantizeLinear`, `QLinearConv`), so any
//! bundle (pretrained or trained) is calibrated from the very graph that
//! gets quantized, and the quantized graph is evaluated with ONNX's integer
//! semantics (int32 accumulation, round half to even, saturation) before it
//! is written. The graph writing itself is in
//! [`tern_model_format::quantize`].

mod auto;
mod bias;
mod calibrate;
mod compare;
mod interp;
mod recipes;
mod session;

pub use auto::*;
pub use bias::*;
pub use calibrate::*;
pub use compare::*;
pub use interp::*;
pub use recipes::*;
pub use session::*;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use prost::Message;
use tern_model_format::onnx;

use tern_model_format::{Bundle, Manifest};

/// Images per forward pass.
const BATCH: usize = 16;

/// Calibration images used by the empirical bias correction (held in
/// memory at once, layer by layer: ~2 GB at 224×224 for this many).
pub const BIAS_CORRECTION_IMAGES: usize = 64;

/// Calibration images used to rank the layers by sensitivity (enough to
/// rank them; each layer costs a forward pass over them).
pub const SENSITIVITY_IMAGES: usize = 32;

/// Everything `tern-host quantize` does, as a library call.
pub struct Request<'a> {
    /// The float bundle.
    pub bundle: &'a Path,
    /// Calibration images.
    pub calib_files: &'a [PathBuf],
    /// Where they came from (recorded in the manifest).
    pub calib_source: String,
    /// Held-out images for the float-vs-int8 comparison (none: no
    /// comparison). Calibration images among them are an error.
    pub eval_files: &'a [PathBuf],
    /// Where they came from (recorded in the manifest).
    pub eval_source: String,
    /// Where to write the int8 bundle.
    pub out: &'a Path,
    /// Seed of the image draws (recorded).
    pub seed: u64,
}

/// What [`quantize_bundle`] did.
pub struct Outcome {
    /// The written manifest.
    pub manifest: Manifest,
    /// The float-vs-int8 comparison, when held-out images were given.
    pub comparison: Option<Comparison>,
    /// Size of the float and int8 files in bytes.
    pub sizes: (u64, u64),
}

/// The ONNX graph of the float bundle at `path`.
pub fn float_graph(path: &Path) -> Result<onnx::GraphProto> {
    let bundle = Bundle::read(path).with_context(|| format!("cannot load bundle {}", path.display()))?;
    let model = onnx::ModelProto::decode(bundle.onnx.as_slice())
        .with_context(|| format!("{}: cannot decode the ONNX model", path.display()))?;
    model.graph.with_context(|| format!("{}: the model has no graph", path.display()))
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Calibrates, quantizes, evaluates and writes the int8 bundle.
pub fn quantize_bundle(r: &Request, recipe: &Recipe) -> Result<Outcome> {
    let mut session = Session::new(r)?;
    let q = session.quantize(recipe)?;
    let manifest = q.write(r.out)?;
    Ok(Outcome { manifest, comparison: q.comparison, sizes: (file_size(r.bundle), file_size(r.out)) })
}
