//! Reading and writing named f32 arrays in safetensors files.
use std::collections::HashMap;
use std::path::Path;

use ndarray::Array2;
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// Write named f32 tensors (name, shape, values) to a safetensors file (replaced whole or not at all).
pub fn write_f32(path: &Path, tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            (name.to_string(), data.iter().flat_map(|v| v.to_le_bytes()).collect(), shape.clone())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(name, data, shape)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .map_err(|e| Error::invalid(format!("tensor {name}: {e}")))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let out = safetensors::serialize(views, None::<HashMap<String, String>>)
        .map_err(|e| Error::invalid(format!("could not serialize {}: {e}", path.display())))?;
    super::output::write_file(path, &out)
}

/// Read a 2-D f32 tensor `name` (or the only tensor when `name` is `None`).
pub fn read_matrix(path: &Path, name: Option<&str>) -> Result<Array2<f32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, &e))?;
    let table = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::invalid(format!("{}: not a safetensors file: {e}", path.display())))?;
    let name = match name {
        Some(n) => n.to_string(),
        None => {
            let names = table.names();
            if names.contains(&"theta") {
                "theta".to_string()
            } else if names.len() == 1 {
                names[0].to_string()
            } else {
                return Err(Error::invalid(format!(
                    "{}: holds {} tensors {names:?}; choose one with --tensor",
                    path.display(),
                    names.len()
                )));
            }
        }
    };
    let view =
        table.tensor(&name).map_err(|_| Error::invalid(format!("{}: no tensor named {name:?}", path.display())))?;
    if view.dtype() != Dtype::F32 {
        return Err(Error::invalid(format!("{}: tensor {name} is {:?}, expected F32", path.display(), view.dtype())));
    }
    let shape = view.shape();
    if shape.len() != 2 {
        return Err(Error::invalid(format!("{}: tensor {name} has shape {shape:?}, expected [N, D]", path.display())));
    }
    let values: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    Array2::from_shape_vec((shape[0], shape[1]), values).map_err(|e| Error::invalid(e.to_string()))
}
