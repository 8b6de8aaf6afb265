//! Reading and rewriting FFN neurons at chosen positions during a forward pass.

use std::cell::RefCell;

use candle_core::Tensor;

use super::bert::{BertMaskedLm, FfnHook};
use crate::error::{Error, Result};

/// A neuron: unit `index` of layer `layer`'s FFN intermediate output. In JSON:
/// `{"layer": 9, "index": 1234}`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Neuron {
    /// 0-based layer.
    pub layer: usize,
    /// 0-based unit within the layer (`< intermediate_size`).
    pub index: usize,
}

/// What to do to a neuron's activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NeuronOp {
    /// Multiply by a factor (0 suppresses, 2 amplifies).
    Scale(f64),
    /// Replace by a value.
    Set(f64),
}

/// Rewrites chosen neurons at one position per batch item (normally the `[MASK]`) and
/// leaves every other neuron, position and layer bit-for-bit untouched.
#[derive(Debug, Clone)]
pub struct NeuronPatch {
    /// Position to patch in each batch item.
    pub positions: Vec<usize>,
    /// The neurons and what to do to them.
    pub edits: Vec<(Neuron, NeuronOp)>,
}

impl FfnHook for NeuronPatch {
    fn apply(&self, layer: usize, activation: Tensor) -> Result<Tensor> {
        if !self.edits.iter().any(|(n, _)| n.layer == layer) {
            return Ok(activation);
        }
        let (batch, seq, width) = activation.dims3()?;
        // out = activation · scale + shift, with scale 1 and shift 0 everywhere else:
        // exact for untouched entries.
        let mut scale = vec![1f64; batch * seq * width];
        let mut shift = vec![0f64; batch * seq * width];
        for (b, &position) in self.positions.iter().enumerate().take(batch) {
            for (neuron, op) in self.edits.iter().filter(|(n, _)| n.layer == layer) {
                if neuron.index >= width || position >= seq {
                    return Err(Error::Neuron(format!(
                        "neuron {}:{} at position {position} is outside the activation [{seq}, {width}]",
                        neuron.layer, neuron.index
                    )));
                }
                let at = (b * seq + position) * width + neuron.index;
                match *op {
                    NeuronOp::Scale(f) => scale[at] *= f,
                    NeuronOp::Set(v) => {
                        scale[at] = 0.0;
                        shift[at] = v;
                    }
                }
            }
        }
        let dev = activation.device();
        let dtype = activation.dtype();
        let scale = Tensor::from_vec(scale, (batch, seq, width), dev)?.to_dtype(dtype)?;
        let shift = Tensor::from_vec(shift, (batch, seq, width), dev)?.to_dtype(dtype)?;
        Ok(activation.mul(&scale)?.add(&shift)?)
    }
}

/// Records the neurons of every layer at one position per batch item.
#[derive(Debug, Default)]
pub struct ActivationCapture {
    positions: Vec<usize>,
    layers: RefCell<Vec<Tensor>>,
}

impl ActivationCapture {
    /// Captures at `positions[b]` in batch item `b`.
    pub fn new(positions: Vec<usize>) -> Self {
        Self {
            positions,
            layers: RefCell::new(Vec::new()),
        }
    }

    /// One `[batch, intermediate]` tensor per layer, bottom first.
    pub fn into_layers(self) -> Vec<Tensor> {
        self.layers.into_inner()
    }
}

impl FfnHook for ActivationCapture {
    fn apply(&self, layer: usize, activation: Tensor) -> Result<Tensor> {
        let rows = BertMaskedLm::rows_at(&activation, &self.positions)?;
        let mut layers = self.layers.borrow_mut();
        debug_assert_eq!(layers.len(), layer, "layers are captured in order");
        layers.push(rows);
        Ok(activation)
    }
}
