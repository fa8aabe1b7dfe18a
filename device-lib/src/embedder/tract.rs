//! The pure-Rust backend: the same int8 MiniLM, run by `tract` (no native runtime, so it
//! builds for every target Rust does: 32-bit ARM TVs, WebAssembly).
//!
//! tract has no Microsoft contrib operators, so it runs `minilm/model-tract.onnx`: the
//! converted model with each `DynamicQuantizeMatMul` spelled in standard operators
//! (`DynamicQuantizeLinear` + `MatMulInteger`, `scripts/convert_model.py --standard-ops`).
//! The arithmetic is the same (activations quantised per tensor to uint8, int8 weights,
//! int32 accumulation) and the weights stay int8 in memory. The sequence length is a
//! symbol: one optimised plan serves every text length. tract runs on the calling thread.
//! The converter also writes the attention mask as a plain `Unsqueeze` (the exporter's
//! `GatherND` version is one tract 0.23 mis-infers).

use crate::error::{DeviceError, Result};
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::*;

pub(super) struct TractModel {
    plan: Arc<TypedSimplePlan>,
    /// The model's inputs in order.
    inputs: Vec<Input>,
}

#[derive(Clone, Copy)]
enum Input {
    Ids,
    Mask,
    Types,
}

impl TractModel {
    pub(super) fn load(model_path: &Path) -> Result<Self> {
        let asset = |e: TractError| DeviceError::Asset {
            what: "model",
            path: model_path.to_path_buf(),
            reason: format!("{e:#}"),
        };
        // The graph's intermediate shape annotations name a symbolic batch where the
        // converted embedding lookup yields 1: tract infers every shape itself instead.
        let mut model = tract_onnx::onnx()
            .with_ignore_value_info(true)
            .model_for_path(model_path)
            .map_err(asset)?;
        let names: Vec<String> = model
            .input_outlets()
            .map_err(asset)?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        super::check_inputs(model_path, &refs)?;
        let mut inputs = Vec::new();
        for name in &names {
            inputs.push(match name.as_str() {
                "input_ids" => Input::Ids,
                "attention_mask" => Input::Mask,
                "token_type_ids" => Input::Types,
                other => {
                    return Err(DeviceError::Asset {
                        what: "model",
                        path: model_path.to_path_buf(),
                        reason: format!("unexpected input {other:?}"),
                    });
                }
            });
        }
        // The graph's own name for the sequence length (its shape annotations use it), with
        // the batch fixed at 1.
        let seq = model.sym("sequence");
        for i in 0..inputs.len() {
            let fact = InferenceFact::dt_shape(i64::datum_type(), tvec!(1.to_dim(), seq.to_dim()));
            model.set_input_fact(i, fact).map_err(asset)?;
        }
        let plan = model.into_optimized().map_err(asset)?.into_runnable().map_err(asset)?;
        Ok(TractModel { plan, inputs })
    }

    /// The last hidden state, `n × EMBEDDING_DIM` floats, with its shape.
    pub(super) fn hidden(
        &mut self,
        ids: Vec<i64>,
        mask: Vec<i64>,
        types: Vec<i64>,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        let n = ids.len();
        let err = |e: TractError| DeviceError::Embedding(format!("{e:#}"));
        let tensor = |v: Vec<i64>| -> Result<TValue> {
            Ok(Tensor::from_shape(&[1, n], &v).map_err(err)?.into())
        };
        let mut values: TVec<TValue> = tvec![];
        for input in &self.inputs {
            values.push(match input {
                Input::Ids => tensor(ids.clone())?,
                Input::Mask => tensor(mask.clone())?,
                Input::Types => tensor(types.clone())?,
            });
        }
        let outputs = self.plan.run(values).map_err(err)?;
        let out = outputs.first().ok_or_else(|| DeviceError::Embedding("no output".into()))?;
        let shape = out.shape().to_vec();
        let view = out.to_plain_array_view::<f32>().map_err(err)?;
        Ok((shape, view.iter().copied().collect()))
    }
}
