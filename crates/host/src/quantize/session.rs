//! A float bundle loaded once to try recipes on: [`Session`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use prost::Message;
use tch::{Kind, Tensor};
use tern_model_format::onnx;

use crate::data::progress;
use tern_model_format::quantize::{calibration_tensors, mean_tensors, quantize_graph, Method, Options};
use tern_model_format::{Bundle, Manifest};

use super::{
    calibrate, channel_means, compare, empirical_bias_correction, fake_quant_per_channel, file_size, load_batches,
    Comparison, OnnxNet, Recipe, Request, BATCH, BIAS_CORRECTION_IMAGES, SENSITIVITY_IMAGES,
};

/// How much one layer's int8 weights alone move the logits.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sensitivity {
    /// The layer (its weight's name without `.weight`).
    pub layer: String,
    /// Mean |Δ logit| against the float graph.
    pub mean_abs_logit_diff: f64,
    /// Weights in the layer.
    pub params: usize,
}

/// An int8 graph made by a [`Session`], not yet written.
pub struct Quantized {
    /// The recipe.
    pub recipe: Recipe,
    /// The graph.
    pub graph: onnx::GraphProto,
    /// The manifest to write with it.
    pub manifest: Manifest,
    /// The float-vs-int8 comparison on the held-out images.
    pub comparison: Option<Comparison>,
}

impl Quantized {
    /// Writes the bundle (atomically, checksummed) to `out`.
    pub fn write(&self, out: &Path) -> Result<Manifest> {
        tern_model_format::bundle::write(out, self.graph.clone(), self.manifest.clone())
            .with_context(|| format!("cannot write {}", out.display()))
    }
}

/// A float bundle with its calibration and held-out images loaded once, to
/// try one or more [`Recipe`]s.
pub struct Session<'a> {
    request: &'a Request<'a>,
    bundle: Bundle,
    graph: onnx::GraphProto,
    float: OnnxNet,
    calib: Option<Vec<Tensor>>,
    eval: Option<(Vec<Tensor>, Vec<PathBuf>)>,
    sensitivity: Option<Vec<Sensitivity>>,
}

impl<'a> Session<'a> {
    /// Loads the float bundle and checks the image lists.
    pub fn new(r: &'a Request<'a>) -> Result<Session<'a>> {
        let bundle = Bundle::read(r.bundle).with_context(|| format!("cannot load bundle {}", r.bundle.display()))?;
        if bundle.manifest.precision != tern_model_format::manifest::Precision::F32 {
            bail!(
                "{}: already quantized ({:?}); quantize the float bundle",
                r.bundle.display(),
                bundle.manifest.precision
            );
        }
        let model = onnx::ModelProto::decode(bundle.onnx.as_slice())
            .with_context(|| format!("{}: cannot decode the ONNX model", r.bundle.display()))?;
        let graph = model.graph.with_context(|| format!("{}: the model has no graph", r.bundle.display()))?;
        let float = OnnxNet::new(&graph, &bundle.manifest)?;
        if r.calib_files.is_empty() {
            bail!("no calibration images");
        }
        let calib: std::collections::HashSet<PathBuf> =
            r.calib_files.iter().filter_map(|f| f.canonicalize().ok()).collect();
        if let Some(f) = r.eval_files.iter().find(|f| f.canonicalize().is_ok_and(|c| calib.contains(&c))) {
            bail!(
                "{} is both a calibration and a held-out image; held-out images must be new to the model",
                f.display()
            );
        }
        Ok(Session { request: r, bundle, graph, float, calib: None, eval: None, sensitivity: None })
    }

    fn calib_batches(&mut self) -> Result<&[Tensor]> {
        if self.calib.is_none() {
            let (b, _) = load_batches(self.request.calib_files, &self.bundle.manifest.preprocessing, "calibration")?;
            self.calib = Some(b);
        }
        Ok(self.calib.as_deref().unwrap_or_default())
    }

    /// How much each weight layer alone moves the logits when its weights
    /// become int8 (every other layer float): mean |Δ logit| over (at most
    /// [`SENSITIVITY_IMAGES`] of) the calibration images, most sensitive
    /// first. Computed once per session.
    pub fn sensitivity(&mut self) -> Result<&[Sensitivity]> {
        if self.sensitivity.is_none() {
            self.calib_batches()?;
            // Evenly spaced over all calibration images: a list sorted by
            // class folder would otherwise be ranked on its first classes.
            let all = self.calib.as_deref().unwrap_or_default();
            let batches: Vec<Tensor> = if all.is_empty() {
                Vec::new()
            } else {
                let all = Tensor::cat(all, 0);
                let n = all.size()[0];
                let step = (n / SENSITIVITY_IMAGES as i64).max(1);
                let rows = Tensor::arange_start_step(0, n, step, (Kind::Int64, all.device()));
                let rows = rows.narrow(0, 0, rows.size()[0].min(SENSITIVITY_IMAGES as i64));
                all.index_select(0, &rows).split(BATCH as i64, 0)
            };
            let reference: Vec<Tensor> =
                batches.iter().map(|x| tch::no_grad(|| self.float.run(x, &[], |_, _| {}))).collect::<Result<_>>()?;
            let params: HashMap<&str, usize> = self
                .graph
                .initializer
                .iter()
                .map(|t| (t.name.as_deref().unwrap_or_default(), t.dims.iter().product::<i64>().max(0) as usize))
                .collect();
            // Graph order; each layer's prefix is the float graph's, so the
            // float values just before it are computed once (shared by all
            // layers) and only the rest of the graph runs per layer.
            let net = &self.float;
            let layers: Vec<usize> = (0..net.nodes.len())
                .filter(|&i| matches!(net.nodes[i].op_type.as_deref(), Some("Conv" | "Gemm")))
                .filter(|&i| net.nodes[i].input.get(1).is_some_and(|w| net.consts.contains_key(w)))
                .collect();
            let last_use = net.last_uses();
            let mut prefix: Vec<HashMap<String, Tensor>> =
                batches.iter().map(|x| HashMap::from([(net.input.clone(), x.shallow_clone())])).collect();
            let mut done = 0usize;
            let bar = progress(layers.len() as u64, "layer sensitivity");
            let mut out = Vec::new();
            for &li in &layers {
                bar.inc(1);
                // Advance the prefix to just before node `li`.
                for k in done..li {
                    let n = &net.nodes[k];
                    let o = n.output.first().cloned().unwrap_or_default();
                    for v in prefix.iter_mut() {
                        let y = tch::no_grad(|| net.eval(n, |name| v.get(name)))?;
                        v.insert(o.clone(), y);
                        OnnxNet::drop_dead(v, &last_use, k);
                    }
                }
                done = li;
                let w = &net.nodes[li].input[1];
                let wq = match net.consts.get(w) {
                    Some(t) => fake_quant_per_channel(t),
                    None => continue,
                };
                let (mut sum, mut count) = (0f64, 0f64);
                for (v, r) in prefix.iter().zip(&reference) {
                    let y = tch::no_grad(|| net.run_from(li, v, (w, &wq)))?;
                    sum += (&y - r).abs().sum(Kind::Double).double_value(&[]);
                    count += r.numel() as f64;
                }
                out.push(Sensitivity {
                    layer: tern_model_format::quantize::layer_name(w),
                    mean_abs_logit_diff: sum / count.max(1.0),
                    params: params.get(w.as_str()).copied().unwrap_or(0),
                });
            }
            bar.finish_and_clear();
            out.sort_by(|a, b| b.mean_abs_logit_diff.total_cmp(&a.mean_abs_logit_diff));
            self.sensitivity = Some(out);
        }
        Ok(self.sensitivity.as_deref().unwrap_or_default())
    }

    /// The layers to keep float for `min_shrink`: by sensitivity per
    /// parameter (the cheapest fixes first), while the int8 graph stays
    /// `min_shrink`× smaller than the float one.
    fn sensitive_layers(&mut self, options: &Options, min_shrink: f64) -> Result<Vec<String>> {
        // The ratio is between the files, manifests included: the float
        // bundle's manifest is carried over, and the int8 one adds the
        // quantization record (with the sensitivity table) and the
        // comparison; their size is estimated with a margin.
        let float_file = file_size(self.request.bundle) as f64;
        let carried = (float_file - self.graph.encoded_len() as f64).max(0.0);
        // Weight storage is the same in both schemes, and the weights-only
        // graph needs no activation ranges.
        let weights_only = Options { scheme: tern_model_format::quantize::Scheme::Weights, ..options.clone() };
        let (all_int8, record) = quantize_graph(&self.graph, &BTreeMap::new(), &weights_only)?;
        let ranked: Vec<Sensitivity> = self.sensitivity()?.to_vec();
        let pretty = |v: serde_json::Value| serde_json::to_string_pretty(&v).map_or(0, |s| s.len()) as f64;
        // Nested in the manifest, the record is indented deeper than alone.
        let added = 1.25 * (pretty(record) + pretty(serde_json::json!(ranked))) + 2048.0;
        let mut room = float_file / min_shrink.max(1.0) - (all_int8.encoded_len() as f64 + carried + added);
        let mut ranked = ranked;
        ranked.sort_by(|a, b| {
            let per = |s: &Sensitivity| s.mean_abs_logit_diff / s.params.max(1) as f64;
            per(b).total_cmp(&per(a))
        });
        let mut keep = Vec::new();
        for s in ranked {
            // float32 instead of int8: three more bytes a weight.
            let extra = 3.0 * s.params as f64;
            if s.mean_abs_logit_diff > 0.0 && extra <= room && !options.float_layers.contains(&s.layer) {
                room -= extra;
                keep.push(s.layer);
            }
        }
        Ok(keep)
    }

    /// Calibrates, quantizes and (with held-out images) compares one recipe.
    pub fn quantize(&mut self, recipe: &Recipe) -> Result<Quantized> {
        let r = self.request;
        let names = calibration_tensors(&self.graph, &recipe.options)?;
        let mean_names = if recipe.bias_correction { mean_tensors(&self.graph, &recipe.options)? } else { Vec::new() };
        let mut options = recipe.options.clone();
        let mut kept_float = Vec::new();
        if let Some(shrink) = recipe.min_shrink {
            kept_float = self.sensitive_layers(&options, shrink)?;
            options.float_layers.extend(kept_float.iter().cloned());
        }
        let used_images = !(names.is_empty() && mean_names.is_empty());
        let mut ranges = BTreeMap::new();
        if !mean_names.is_empty() {
            self.calib_batches()?;
            options.input_means = channel_means(&self.float, self.calib.as_deref().unwrap_or_default(), &mean_names)?;
        }
        if !names.is_empty() {
            self.calib_batches()?;
            ranges = calibrate(&self.float, self.calib.as_deref().unwrap_or_default(), &names, recipe.method)?;
        }
        let (mut qgraph, mut record) = quantize_graph(&self.graph, &ranges, &options)?;
        let mut empirical = serde_json::Value::Null;
        if recipe.bias_correction && options.scheme == tern_model_format::quantize::Scheme::Weights {
            // Evenly spaced over the calibration list, which may be sorted
            // by class folder.
            let files = r.calib_files;
            let step = (files.len() / BIAS_CORRECTION_IMAGES).max(1);
            let some: Vec<PathBuf> = files.iter().step_by(step).take(BIAS_CORRECTION_IMAGES).cloned().collect();
            let (batches, kept) = load_batches(&some, &self.bundle.manifest.preprocessing, "bias correction")?;
            let int8 = OnnxNet::new(&qgraph, &self.bundle.manifest)?;
            let biases = empirical_bias_correction(&self.float, &int8, &batches)?;
            let images = kept.len();
            tern_model_format::quantize::replace_float_initializers(&mut qgraph, &biases)?;
            let biases: Vec<&String> = biases.keys().collect();
            empirical = serde_json::json!({"images": images, "biases": biases});
        }
        let mut manifest = self.bundle.manifest.clone();
        let method = match recipe.method {
            Method::MinMax => serde_json::json!({"method": "minmax"}),
            Method::Percentile(p) => serde_json::json!({"method": "percentile", "percentile": p}),
            Method::Entropy => serde_json::json!({"method": "entropy", "bins": tern_model_format::quantize::BINS}),
        };
        record["recipe"] = recipe.name().into();
        if let Some(shrink) = recipe.min_shrink {
            record["sensitive_float"] = serde_json::json!({
                "min_shrink": shrink,
                "kept_float": kept_float,
                "measure": format!("mean |Δ logit| on up to {SENSITIVITY_IMAGES} calibration images with only that layer's weights int8"),
                "sensitivity": self.sensitivity.as_deref().unwrap_or_default(),
            });
        }
        record["calibration"] = serde_json::json!({
            "ranges": method,
            "images": if used_images { r.calib_files.len() } else { 0 },
            "bias_correction": recipe.bias_correction,
            "empirical_bias_correction": empirical,
            "source": r.calib_source,
            "seed": r.seed,
        });
        record["float_bundle_graph_sha256"] = self.bundle.manifest.graph_sha256.clone().into();

        let comparison = if r.eval_files.is_empty() {
            None
        } else {
            if self.eval.is_none() {
                self.eval = Some(load_batches(r.eval_files, &manifest.preprocessing, "held-out")?);
            }
            let (batches, kept) = self.eval.as_ref().map(|(b, k)| (b.as_slice(), k.as_slice())).unwrap_or_default();
            let int8 = OnnxNet::new(&qgraph, &manifest)?;
            let c = compare(&self.float, &int8, batches, kept, &manifest.labels)?;
            let mut metrics = manifest.metrics.take().unwrap_or_else(|| serde_json::json!({}));
            if !metrics.is_object() {
                metrics = serde_json::json!({"previous": metrics});
            }
            metrics["int8_vs_float"] = serde_json::json!({
                "held_out": r.eval_source,
                "images": c.images,
                "top1_agreement": c.top1_agreement,
                "float_accuracy": c.float_accuracy,
                "int8_accuracy": c.int8_accuracy,
                "max_abs_logit_diff": c.max_abs_logit_diff,
                "evaluated_by": "tern-host (libtorch, ONNX integer semantics)",
            });
            manifest.metrics = Some(metrics);
            Some(c)
        };
        manifest.precision = tern_model_format::manifest::Precision::Int8;
        manifest.quantization = Some(record);
        manifest.provenance.created_by = format!("tern-host {} quantize", env!("CARGO_PKG_VERSION"));
        Ok(Quantized { recipe: recipe.clone(), graph: qgraph, manifest, comparison })
    }
}
