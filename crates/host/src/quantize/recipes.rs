//! One way to quantize: [`Recipe`].

use tern_model_format::onnx;
use tern_model_format::quantize::{layer_name, Method, Options};

/// One way to quantize: a range method, graph options and bias correction.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Range method.
    pub method: Method,
    /// Graph options.
    pub options: Options,
    /// Bias correction of int8-weight float layers.
    pub bias_correction: bool,
    /// Keep the weights of the most sensitive layers in float (see
    /// [`Session::sensitivity`](super::Session::sensitivity)) as long as the graph stays this many
    /// times smaller than the float one; `None`: every layer int8.
    pub min_shrink: Option<f64>,
}

impl Recipe {
    /// A short name, e.g. `static/percentile-99.99/per-tensor`.
    pub fn name(&self) -> String {
        let scheme = match self.options.scheme {
            tern_model_format::quantize::Scheme::Weights => "weights",
            tern_model_format::quantize::Scheme::Static => "static",
            tern_model_format::quantize::Scheme::Qdq => "qdq",
        };
        let mut s = format!("{scheme}/{}", method_name(self.method));
        if self.options.scheme == tern_model_format::quantize::Scheme::Static {
            s.push_str(if self.options.per_channel { "/per-channel" } else { "/per-tensor" });
        }
        if !self.options.float_layers.is_empty() {
            s.push_str(&format!("/float:{}", self.options.float_layers.join("+")));
        }
        if !self.bias_correction {
            s.push_str("/no-bias-correction");
        }
        if let Some(r) = self.min_shrink {
            s.push_str(&format!("/sensitive-float-{r}x"));
        }
        s
    }
}

pub(super) fn method_name(m: Method) -> String {
    match m {
        Method::MinMax => "minmax".into(),
        Method::Percentile(p) => format!("percentile-{p}"),
        Method::Entropy => "entropy".into(),
    }
}

/// The layers of the first `n` convolutions of `graph`, in graph order (the
/// stem and the block after it, for the backbones Tern exports): the layers
/// that `tern-host quantize --float-first` keeps in float.
pub fn first_convolutions(graph: &onnx::GraphProto, n: usize) -> Vec<String> {
    graph
        .node
        .iter()
        .filter(|node| node.op_type.as_deref() == Some("Conv"))
        .filter_map(|node| node.input.get(1).map(|w| layer_name(w)))
        .take(n)
        .collect()
}
