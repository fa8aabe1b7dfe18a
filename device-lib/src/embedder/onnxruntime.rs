//! The ONNX Runtime backend: the converted int8 model (`DynamicQuantizeMatMul`) run by
//! `libonnxruntime.so`, loaded at run time from the configured path.
//!
//! Memory: ONNX Runtime's CPU arena and memory-pattern planner keep freed buffers for reuse;
//! for one short sequence at a time they only add resident memory, so both are off. Weight
//! prepacking is off as well: it copies every `MatMul` weight into a second, packed layout.
//! `omega-device-bench` reports the resulting peak RSS.

use crate::error::{DeviceError, Result};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use std::path::Path;
use std::sync::Mutex;

pub(super) struct OrtModel {
    session: Session,
    wants_token_types: bool,
}

static ORT_ENV: Mutex<Option<ort::environment::Environment>> = Mutex::new(None);

/// The process's ONNX Runtime environment, loading the library on first use. A failed load
/// leaves nothing behind, so a later call with a correct path still works.
fn ort_environment(dylib: &Path) -> Result<ort::environment::Environment> {
    let asset = |reason: String| DeviceError::Asset {
        what: "ONNX Runtime library",
        path: dylib.to_path_buf(),
        reason,
    };
    if !dylib.is_file() {
        return Err(asset("no such file".into()));
    }
    let mut env = ORT_ENV.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(e) = env.as_ref() {
        return Ok(e.clone());
    }
    let built = ort::init_from(dylib)
        .map_err(|e| asset(e.to_string()))?
        .with_name("omega")
        .with_telemetry(false)
        .build()
        .map_err(|e| asset(e.to_string()))?;
    *env = Some(built.clone());
    Ok(built)
}

impl OrtModel {
    pub(super) fn load(
        model_path: &Path,
        dylib: &Path,
        intra_threads: usize,
        lean: bool,
    ) -> Result<Self> {
        let env = ort_environment(dylib)?;
        let model_err = |e: ort::Error| DeviceError::Asset {
            what: "model",
            path: model_path.to_path_buf(),
            reason: e.to_string(),
        };
        let opt = |e: ort::Error<ort::session::builder::SessionBuilder>| model_err(e.into());
        let cpu = ort::ep::CPU::default().with_arena_allocator(!lean).build();
        let session = Session::builder(&env)
            .map_err(model_err)?
            .with_execution_providers([cpu])
            .map_err(opt)?
            .with_intra_threads(intra_threads)
            .map_err(opt)?
            .with_inter_threads(1)
            .map_err(opt)?
            .with_memory_pattern(!lean)
            .map_err(opt)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(opt)?
            .with_config_entry("session.disable_prepacking", if lean { "1" } else { "0" })
            .map_err(opt)?
            .commit_from_file(model_path)
            .map_err(model_err)?;
        let names: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
        super::check_inputs(model_path, &names)?;
        let wants_token_types = names.contains(&"token_type_ids");
        Ok(OrtModel { session, wants_token_types })
    }

    /// The last hidden state, `n × EMBEDDING_DIM` floats, with its shape.
    pub(super) fn hidden(
        &mut self,
        ids: Vec<i64>,
        mask: Vec<i64>,
        types: Vec<i64>,
    ) -> Result<(Vec<usize>, Vec<f32>)> {
        let n = ids.len();
        let ort_err = |e: ort::Error| DeviceError::Embedding(e.to_string());
        let t_ids = Tensor::from_array(([1usize, n], ids)).map_err(ort_err)?;
        let t_mask = Tensor::from_array(([1usize, n], mask)).map_err(ort_err)?;
        let outputs = if self.wants_token_types {
            let t_types = Tensor::from_array(([1usize, n], types)).map_err(ort_err)?;
            self.session.run(ort::inputs![
                "input_ids" => t_ids,
                "attention_mask" => t_mask,
                "token_type_ids" => t_types,
            ])
        } else {
            self.session.run(ort::inputs!["input_ids" => t_ids, "attention_mask" => t_mask])
        }
        .map_err(ort_err)?;
        let (shape, hidden) = outputs[0].try_extract_tensor::<f32>().map_err(ort_err)?;
        let shape = shape.iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
        Ok((shape, hidden.to_vec()))
    }
}
