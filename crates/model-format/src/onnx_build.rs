//! Building ONNX graphs: nodes, attributes, initializers and value infos,
//! written once for the exporter, the int8 rewriting and the test graphs.
//!
//! Tensors are written as little-endian `raw_data`, as ONNX stores them.

use crate::onnx::{self, attribute_proto::AttributeType, tensor_proto::DataType};

/// A node `op` reading `inputs` and writing `output`, named after its output.
pub fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<onnx::AttributeProto>) -> onnx::NodeProto {
    onnx::NodeProto {
        name: Some(output.to_owned()),
        op_type: Some(op.to_owned()),
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: vec![output.to_owned()],
        attribute,
        ..Default::default()
    }
}

/// A node like [`node`] with a name of its own (the QDQ rewrite names its
/// conversions `{tensor}.quantize` / `.dequantize`).
pub fn named_node(
    op: &str,
    name: &str,
    inputs: &[&str],
    output: &str,
    attribute: Vec<onnx::AttributeProto>,
) -> onnx::NodeProto {
    onnx::NodeProto { name: Some(name.to_owned()), ..node(op, inputs, output, attribute) }
}

/// An integer attribute.
pub fn attr_int(name: &str, v: i64) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: Some(name.to_owned()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

/// An attribute holding a list of integers.
pub fn attr_ints(name: &str, v: &[i64]) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: Some(name.to_owned()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn raw_tensor(name: &str, dims: &[i64], data_type: DataType, raw: Vec<u8>) -> onnx::TensorProto {
    onnx::TensorProto {
        name: Some(name.to_owned()),
        dims: dims.to_vec(),
        data_type: Some(data_type as i32),
        raw_data: Some(raw),
        ..Default::default()
    }
}

/// A float tensor of shape `dims`.
pub fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> onnx::TensorProto {
    raw_tensor(name, dims, DataType::Float, data.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// An int8 tensor of shape `dims`.
pub fn tensor_i8(name: &str, dims: &[i64], data: &[i8]) -> onnx::TensorProto {
    raw_tensor(name, dims, DataType::Int8, data.iter().map(|&v| v as u8).collect())
}

/// An int32 tensor of shape `dims`.
pub fn tensor_i32(name: &str, dims: &[i64], data: &[i32]) -> onnx::TensorProto {
    raw_tensor(name, dims, DataType::Int32, data.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// An int64 tensor of shape `dims`.
pub fn tensor_i64(name: &str, dims: &[i64], data: &[i64]) -> onnx::TensorProto {
    raw_tensor(name, dims, DataType::Int64, data.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// A float tensor value of a fixed `shape` (a graph input or output).
pub fn value_info_f32(name: &str, shape: &[i64]) -> onnx::ValueInfoProto {
    use onnx::tensor_shape_proto::{dimension::Value, Dimension};
    use onnx::type_proto::{Tensor, Value as TypeValue};
    onnx::ValueInfoProto {
        name: Some(name.to_owned()),
        r#type: Some(onnx::TypeProto {
            value: Some(TypeValue::TensorType(Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(onnx::TensorShapeProto {
                    dim: shape
                        .iter()
                        .map(|&d| Dimension { value: Some(Value::DimValue(d)), ..Default::default() })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn tensors_are_little_endian_raw_data_of_their_type() {
        let t = tensor_f32("w", &[2], &[1.0, -2.5]);
        assert_eq!((t.dims.as_slice(), t.data_type), (&[2i64][..], Some(DataType::Float as i32)));
        assert_eq!(t.raw_data.as_deref(), Some(&[0, 0, 128, 63, 0, 0, 32, 192][..]));
        assert_eq!(tensor_i8("q", &[3], &[-1, 0, 127]).raw_data.as_deref(), Some(&[255, 0, 127][..]));
        assert_eq!(tensor_i32("b", &[], &[-2]).raw_data.as_deref(), Some(&[254, 255, 255, 255][..]));
        let t = tensor_i64("s", &[1], &[258]);
        assert_eq!(t.data_type, Some(DataType::Int64 as i32));
        assert_eq!(t.raw_data.as_deref(), Some(&[2, 1, 0, 0, 0, 0, 0, 0][..]));
    }

    #[test]
    fn a_built_graph_survives_encoding() {
        let n = node("Conv", &["x", "w"], "y", vec![attr_ints("pads", &[1, 1, 1, 1]), attr_int("group", 2)]);
        assert_eq!((n.name.as_deref(), n.output.as_slice()), (Some("y"), &["y".to_owned()][..]));
        let g = onnx::GraphProto {
            node: vec![n],
            initializer: vec![tensor_f32("w", &[2, 1, 1, 1], &[1.0, 2.0])],
            input: vec![value_info_f32("x", &[1, 2, 4, 4])],
            output: vec![value_info_f32("y", &[1, 2, 4, 4])],
            ..Default::default()
        };
        let back = onnx::GraphProto::decode(g.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, g);
        let attrs = &back.node[0].attribute;
        assert_eq!(attrs[0].r#type, Some(AttributeType::Ints as i32));
        assert_eq!(attrs[0].ints, [1, 1, 1, 1]);
        assert_eq!((attrs[1].r#type, attrs[1].i), (Some(AttributeType::Int as i32), Some(2)));
    }
}
