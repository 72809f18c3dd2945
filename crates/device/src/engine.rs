//! The inference engine: a bundle loaded once into a tract plan.
//!
//! Before tract reads a graph, [`tern_model_format::validate::check`] checks
//! it (operators, attributes, initializer sizes, a memory budget): tract
//! trusts its input and panics or allocates without bound on crafted
//! graphs. What still goes wrong inside tract is contained: a panic while
//! loading or running becomes an error here, and a plan that panicked in
//! the middle of an inference is replaced by a fresh one before the next.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use image::{DynamicImage, RgbImage};
use tern_model_format::manifest::{Manifest, OutputKind};
use tern_model_format::preprocess::{preprocess, preprocess_rgb8};
use tern_model_format::validate::{self, Limits};
use tern_model_format::Bundle;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::tract_linalg::multithread::Executor;

use crate::threads;

/// The raw outputs of one inference.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Scores before the final activation, one per output unit.
    pub logits: Vec<f32>,
    /// Probabilities, one per output unit.
    pub probabilities: Vec<f32>,
}

pub use tern_model_format::report::Ranked;

/// The float type a plan computes in.
///
/// `F16` applies tract's `f32_to_f16` transform to the decluttered graph
/// before optimisation: weights and activations become half floats, which
/// ARM cores with FP16 arithmetic (Cortex-A76 in the Raspberry Pi 5,
/// Cortex-A78AE in Jetson Orin) run with native f16 kernels. Callers still
/// pass f32 inputs and get f32 outputs. Elsewhere (x86-64) tract emulates
/// f16 and it is slower than f32: it is there to check accuracy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    /// 32-bit floats (the graph as exported).
    #[default]
    F32,
    /// 16-bit floats.
    F16,
}

impl Compute {
    /// `"f32"` or `"f16"`.
    pub fn name(self) -> &'static str {
        match self {
            Compute::F32 => "f32",
            Compute::F16 => "f16",
        }
    }

    /// tract's datum type for this float type.
    pub fn datum_type(self) -> DatumType {
        match self {
            Compute::F32 => DatumType::F32,
            Compute::F16 => DatumType::F16,
        }
    }
}

impl std::fmt::Display for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Compute {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Compute> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Compute::F32),
            "f16" | "float16" | "half" => Ok(Compute::F16),
            _ => bail!("{s:?}: expected f32 or f16"),
        }
    }
}

/// Which kernels run a plan's convolutions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// Tern's fused ops ([`crate::fused`]) where they were measured faster
    /// than tract's on this CPU, tract's own elsewhere.
    #[default]
    Tern,
    /// tract's own kernels only: to measure one against the other.
    Tract,
}

/// Everything that decides how a bundle is loaded and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// The float type the plan computes in.
    pub compute: Compute,
    /// Which kernels run the convolutions.
    pub kernels: Kernels,
    /// Threads for the plan's kernels: 1 runs on the caller's thread, more
    /// on a pool of that many, owned by the [`Classifier`].
    pub threads: usize,
    /// Most bytes the graph's values may need, as estimated by
    /// [`tern_model_format::validate`] before tract sees the graph.
    pub memory_budget: u64,
    /// Put Tern's integer ops ([`crate::int8`]) in the plan of a QDQ
    /// bundle (with [`Kernels::Tern`]). Off by default: they are exact
    /// against their reference loops but not yet faster than tract's own
    /// handling of the same file (docs/performance.md), so they are opt-in
    /// until they are.
    pub int8_ops: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            compute: Compute::F32,
            kernels: Kernels::Tern,
            threads: 1,
            memory_budget: validate::DEFAULT_MEMORY_BUDGET,
            int8_ops: false,
        }
    }
}

impl LoadOptions {
    /// These options computing in `compute`.
    pub fn compute(self, compute: Compute) -> LoadOptions {
        LoadOptions { compute, ..self }
    }

    /// These options with `kernels`.
    pub fn kernels(self, kernels: Kernels) -> LoadOptions {
        LoadOptions { kernels, ..self }
    }

    /// These options with `threads` threads.
    pub fn threads(self, threads: usize) -> LoadOptions {
        LoadOptions { threads, ..self }
    }

    /// These options with a memory budget of `bytes`.
    pub fn memory_budget(self, bytes: u64) -> LoadOptions {
        LoadOptions { memory_budget: bytes, ..self }
    }

    /// These options with Tern's integer ops on or off for QDQ bundles.
    pub fn int8_ops(self, int8_ops: bool) -> LoadOptions {
        LoadOptions { int8_ops, ..self }
    }

    /// tract's executor for [`LoadOptions::threads`]; a plan runs on it
    /// inside [`crate::threads::scope`].
    pub fn executor(&self) -> Result<Executor> {
        match self.threads {
            0 => bail!("threads must be at least 1"),
            1 => Ok(Executor::SingleThread),
            n => {
                threads::split_heads();
                // rayon's pool builder only fails when the OS refuses threads;
                // tract panics then, which becomes this error.
                std::panic::catch_unwind(|| Executor::multithread_with_name(n, "tern"))
                    .map_err(|_| anyhow::anyhow!("cannot start a pool of {n} threads"))
            }
        }
    }
}

/// Reads a bundle's graph into an optimised tract model computing in
/// `options.compute` with `options.kernels`, with the manifest's input shape
/// and its two outputs (logits, probabilities). The model's input and
/// outputs are of the compute type. The graph is checked first
/// ([`tern_model_format::validate`], within `options.memory_budget`), and a
/// panic inside tract is an error.
pub fn optimized_model(bundle: &Bundle, options: &LoadOptions) -> Result<TypedModel> {
    Ok(optimize(bundle, options)?.0)
}

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Runs `f`, turning a panic into an error that says `what` panicked.
fn contained<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| bail!("{what} panicked: {}", panic_message(p.as_ref())))
}

/// [`optimized_model`], and how many of Tern's fused ops it holds.
fn optimize(bundle: &Bundle, options: &LoadOptions) -> Result<(TypedModel, usize)> {
    let limits = Limits { memory_budget: options.memory_budget, ..Limits::default() };
    validate::check(bundle, &limits).context("the graph fails the device's checks")?;
    contained("tract, building the plan,", || optimize_checked(bundle, options))
}

/// [`optimize`] for a graph that passed the checks.
fn optimize_checked(bundle: &Bundle, options: &LoadOptions) -> Result<(TypedModel, usize)> {
    let compute = options.compute;
    let mut fused = 0;
    // Before declutter: it moves depthwise layers channel-last only where
    // tract has a channel-last depthwise kernel.
    crate::kernels::ensure_registered();
    let m = &bundle.manifest;
    let mut model =
        tract_onnx::onnx().model_for_read(&mut bundle.onnx.as_slice()).context("tract cannot read the ONNX graph")?;
    model.select_outputs_by_name([m.io.logits.as_str(), m.io.probabilities.as_str()])?;
    let model = model.with_input_fact(0, f32::fact(m.preprocessing.input_shape()).into())?;
    let mut typed = model.into_typed().and_then(|t| t.into_decluttered()).context("tract cannot type the graph")?;
    fold_constants(&mut typed).context("tract cannot fold the graph's constants")?;
    let model = match compute {
        Compute::F32 => {
            if options.kernels == Kernels::Tern {
                // The integer chains first: the float rewrite would take
                // their convolutions.
                if options.int8_ops {
                    fused = crate::int8::rewrite(&mut typed).context("cannot put the integer convolutions in")?;
                }
                fused += crate::fused::rewrite(&mut typed).context("cannot fuse the convolutions")?;
            }
            typed.into_optimized().context("tract cannot optimise the graph")?
        }
        Compute::F16 => {
            check_f16_convertible(&typed)?;
            let transform = tract_onnx::tract_core::transform::get_transform("f32_to_f16")?
                .context("this tract has no f32_to_f16 transform")?;
            typed.transform(transform.as_ref()).context("tract cannot convert the graph to f16")?;
            typed.into_optimized().context("tract cannot optimise the f16 graph")?
        }
    };
    let want = compute.datum_type();
    let input = model.input_fact(0)?.datum_type;
    let outputs: Vec<DatumType> =
        (0..2).map(|i| model.output_fact(i).map(|f| f.datum_type)).collect::<TractResult<_>>()?;
    if input != want || outputs.iter().any(|&dt| dt != want) {
        bail!("the {compute} plan takes {input:?} and gives {outputs:?}, expected {want:?} throughout");
    }
    Ok((model, fused))
}

/// Largest constant [`fold_constants`] makes, bytes.
const FOLD_LIMIT: usize = 64 << 20;

/// Replaces every node whose inputs are all constants by the constant it
/// computes, up to [`FOLD_LIMIT`] bytes. tract folds only results within
/// max(inputs, 4 MiB) (`CONST_FOLD_MEM_BUDGET`, tract-core
/// `optim/prop_const.rs`), so the f32 image of a large int8 weight — the
/// 1000×1280 classifier of an int8-weights ImageNet bundle, 5.1 MB — would
/// be dequantized (Cast, Mul) and packed again at every inference.
fn fold_constants(model: &mut TypedModel) -> TractResult<()> {
    'again: loop {
        for id in model.eval_order()? {
            let node = model.node(id);
            if node.inputs.is_empty() || node.op_is::<Const>() {
                continue;
            }
            let inputs: Option<TVec<TValue>> =
                model.node_input_facts(id)?.iter().map(|f| f.konst.clone().map(|t| t.into_tvalue())).collect();
            let Some(inputs) = inputs else { continue };
            let Ok(Some(outputs)) = node.op.eval_out_of_plan(inputs) else { continue };
            if outputs.iter().map(|t| t.len() * t.datum_type().size_of()).sum::<usize>() > FOLD_LIMIT {
                continue;
            }
            let name = node.name.clone();
            let mut patch = TypedModelPatch::default();
            for (ix, t) in outputs.into_iter().enumerate() {
                let wire = patch.add_const(format!("{name}.folded.{ix}"), t.into_arc_tensor())?;
                patch.shunt_outside(model, OutletId::new(id, ix), wire)?;
            }
            patch.apply(model)?;
            continue 'again;
        }
        return Ok(());
    }
}

/// Refuses f16 for graphs with integer arithmetic: tract's `f32_to_f16`
/// converts float tensors only, and the f32 scales feeding its quantized
/// convolutions would come out as f16, which their kernels do not take. An
/// int8-weights bundle (DequantizeLinear of constant weights, float compute)
/// has folded into float constants by now and passes.
fn check_f16_convertible(model: &TypedModel) -> Result<()> {
    let int8 = |dt: DatumType| dt.is_quantized() || dt == DatumType::I8 || dt == DatumType::U8;
    let nodes: Vec<&TypedNode> = model
        .nodes()
        .iter()
        .filter(|n| !n.op_is::<Const>() && n.outputs.iter().any(|o| int8(o.fact.datum_type)))
        .collect();
    if let Some(first) = nodes.first() {
        bail!(
            "f16 needs a float graph, and this one computes in int8 ({} int8 nodes, e.g. {:?}, {}); \
             run it in f32, or run its float original in f16",
            nodes.len(),
            first.name,
            first.op().name()
        );
    }
    Ok(())
}

/// A bundle ready to run: the manifest and an optimised tract plan.
pub struct Classifier {
    manifest: Manifest,
    options: LoadOptions,
    executor: Executor,
    fused: usize,
    plan: Arc<TypedSimplePlan>,
    /// The plan's state; `None` once an inference panicked and no fresh
    /// state could be made.
    state: Option<TypedSimpleState>,
}

impl Classifier {
    /// Loads, verifies (manifest, checksum, shapes) and optimises the bundle
    /// at `path`.
    pub fn load(path: &Path, options: &LoadOptions) -> Result<Classifier> {
        let bundle = Bundle::read(path).with_context(|| format!("cannot load bundle {}", path.display()))?;
        let what = if options.compute == Compute::F32 { String::new() } else { format!(" for {}", options.compute) };
        Classifier::from_bundle(bundle, options)
            .with_context(|| format!("cannot prepare bundle {}{what}", path.display()))
    }

    /// Prepares an already validated bundle.
    pub fn from_bundle(bundle: Bundle, options: &LoadOptions) -> Result<Classifier> {
        let executor = options.executor()?;
        let (model, fused) = optimize(&bundle, options)?;
        let (plan, state) = contained("tract, making the plan runnable,", || {
            let plan = model.into_runnable()?;
            let state = TypedSimpleState::new(&plan)?;
            Ok((plan, state))
        })?;
        Ok(Classifier { manifest: bundle.manifest, options: *options, executor, fused, plan, state: Some(state) })
    }

    /// How the bundle was loaded.
    pub fn options(&self) -> &LoadOptions {
        &self.options
    }

    /// The float type the plan computes in.
    pub fn compute(&self) -> Compute {
        self.options.compute
    }

    /// How many of Tern's fused ops ([`crate::fused`]) replaced tract's in
    /// the plan (0 with [`Kernels::Tract`], or where they do not run).
    pub fn fused_ops(&self) -> usize {
        self.fused
    }

    /// The bundle's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The model input for `image`, by the bundle's own preprocessing
    /// (`[1, 3, H, W]` values).
    pub fn preprocess(&self, image: &DynamicImage) -> Vec<f32> {
        preprocess(image, &self.manifest.preprocessing)
    }

    /// Classifies a decoded image: the bundle's preprocessing, then the plan.
    pub fn classify(&mut self, image: &DynamicImage) -> Result<Output> {
        let input = self.preprocess(image);
        self.run(&input)
    }

    /// [`Classifier::classify`] for an RGB frame (e.g. from a camera).
    pub fn classify_rgb8(&mut self, frame: &RgbImage) -> Result<Output> {
        let input = preprocess_rgb8(frame, &self.manifest.preprocessing);
        self.run(&input)
    }

    /// Runs one preprocessed input (`[1, 3, H, W]` values, as made by
    /// [`Classifier::preprocess`]).
    pub fn run(&mut self, input: &[f32]) -> Result<Output> {
        let shape = self.manifest.preprocessing.input_shape();
        if input.len() != shape.iter().product::<usize>() {
            bail!("input has {} values, the model takes {shape:?}", input.len());
        }
        let mut tensor = Tensor::from_shape(&shape, input)?;
        if self.options.compute != Compute::F32 {
            tensor = tensor.cast_to_dt(self.options.compute.datum_type())?.into_owned();
        }
        let Some(state) = self.state.as_mut() else {
            bail!("this plan panicked in an earlier inference and could not be restarted; load the bundle again");
        };
        let executor = self.executor.clone();
        let out = catch_unwind(AssertUnwindSafe(|| threads::scope(&executor, || state.run(tvec!(tensor.into())))));
        let out = match out {
            Ok(r) => r?,
            Err(p) => {
                // The state may hold half-written buffers: never reuse it.
                let plan = &self.plan;
                self.state = catch_unwind(AssertUnwindSafe(|| TypedSimpleState::new(plan).ok())).ok().flatten();
                bail!("tract panicked during the inference: {}", panic_message(p.as_ref()));
            }
        };
        let vec = |i: usize| -> Result<Vec<f32>> {
            let t = out.get(i).context("missing output")?.cast_to::<f32>()?;
            Ok(t.to_plain_array_view::<f32>()?.iter().copied().collect())
        };
        let (logits, probabilities) = (vec(0)?, vec(1)?);
        let width = self.manifest.io.output_width;
        if logits.len() != width || probabilities.len() != width {
            bail!("the graph returned {} values, the manifest says {width}", logits.len());
        }
        Ok(Output { logits, probabilities })
    }

    /// Runs and times one input.
    pub fn run_timed(&mut self, input: &[f32]) -> Result<(Output, Duration)> {
        let t = Instant::now();
        let out = self.run(input)?;
        Ok((out, t.elapsed()))
    }

    /// The `k` most probable labels, best first.
    pub fn top_k(&self, out: &Output, k: usize) -> Vec<Ranked> {
        rank(&self.manifest, out, k)
    }

    /// One probability per label, in label order (see [`label_probabilities`]).
    pub fn label_probabilities(&self, out: &Output) -> Vec<f32> {
        label_probabilities(&self.manifest, out)
    }
}

/// One probability per label, in label order. A binary sigmoid bundle (two
/// labels, one output `p`) gives `[1 − p, p]`.
pub fn label_probabilities(m: &Manifest, out: &Output) -> Vec<f32> {
    if m.io.output_kind == OutputKind::Sigmoid && m.io.output_width == 1 && m.labels.len() == 2 {
        let p = out.probabilities.first().copied().unwrap_or(0.0);
        vec![1.0 - p, p]
    } else {
        out.probabilities.clone()
    }
}

/// Ranks the labels of `out`. A binary sigmoid bundle (two labels, one
/// output `p`) ranks the second label at `p` and the first at `1 − p`.
pub fn rank(m: &Manifest, out: &Output, k: usize) -> Vec<Ranked> {
    let probs = label_probabilities(m, out);
    let mut idx: Vec<usize> = (0..probs.len().min(m.labels.len())).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| Ranked { index: i, label: m.labels[i].clone(), probability: probs[i] }).collect()
}
