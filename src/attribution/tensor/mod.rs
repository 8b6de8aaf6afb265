//! The device-generic attribution engine: the algorithm of the flat engines
//! ([`super::bert`], [`super::decoder`]) in candle tensor ops, so that it runs wherever
//! candle does — on an NVIDIA GPU with `--features cuda` (cuBLAS products, candle's
//! kernels), or on the CPU for checking one against the other (`--engine tensor`).
//!
//! It implements the same [`PromptPass`] as the flat engines, so the integrated-gradients
//! loop ([`super::ig`]) is shared. The architectures are in [`bert`] and [`decoder`],
//! their kernels in [`ops`]. Backward passes are written by hand: nothing is
//! differentiated by candle's autograd, which would form a gradient for every weight
//! the graph reads.

pub mod bert;
pub mod decoder;
mod ops;

pub use ops::Dtypes;

use std::marker::PhantomData;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::model::LanguageModel;

use super::engine::{LayerGradients, PromptPass, Real};
use bert::{BertTensorEngine, BertTensorPass};
use decoder::{DecoderTensorEngine, DecoderTensorPass};

/// The tensor engine of any architecture, computing in `F` on the model's device.
#[derive(Debug, Clone)]
pub struct TensorEngine<F> {
    kind: Kind,
    device: &'static str,
    float: PhantomData<F>,
}

#[derive(Debug, Clone)]
enum Kind {
    Bert(BertTensorEngine),
    Decoder(DecoderTensorEngine),
}

impl<F: Real> TensorEngine<F> {
    /// Takes a loaded model's weights on its own device, in `F`'s dtype (no copy when
    /// the model already has it).
    pub fn from_model(model: LanguageModel) -> Result<Self> {
        Self::with_products(model, F::DTYPE)
    }

    /// As [`Self::from_model`], with the weight products in `products` (bf16 or f16:
    /// mixed precision, see [`Dtypes`]; `F`'s own dtype: none).
    pub fn with_products(model: LanguageModel, products: DType) -> Result<Self> {
        let device = ops::device_name(model.device());
        let dtypes = Dtypes {
            activations: F::DTYPE,
            products,
        };
        let kind = match model {
            LanguageModel::Bert(m) => Kind::Bert(BertTensorEngine::from_model(m, dtypes)?),
            LanguageModel::Llama(m) => Kind::Decoder(DecoderTensorEngine::from_llama(m, dtypes)?),
            LanguageModel::Gpt2(m) => Kind::Decoder(DecoderTensorEngine::from_gpt2(m, dtypes)?),
        };
        Ok(Self {
            kind,
            device,
            float: PhantomData,
        })
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        match &self.kind {
            Kind::Bert(e) => e.layers(),
            Kind::Decoder(e) => e.layers(),
        }
    }

    /// Neurons per layer.
    pub fn intermediate(&self) -> usize {
        match &self.kind {
            Kind::Bert(e) => e.intermediate(),
            Kind::Decoder(e) => e.intermediate(),
        }
    }

    /// The normal pass of one prompt's token ids, read at `position` (a BERT's mask, a
    /// causal model's last token).
    pub fn prepare(&self, ids: &[u32], position: usize) -> Result<Box<dyn PromptPass<F> + '_>> {
        let device = self.device;
        Ok(match &self.kind {
            Kind::Bert(e) => Box::new(Pass {
                inner: Inner::Bert(e.prepare(ids, position).map_err(|e| on_device(e, device))?),
                device,
            }),
            Kind::Decoder(e) => Box::new(Pass {
                inner: Inner::Decoder(e.prepare(ids, position).map_err(|e| on_device(e, device))?),
                device,
            }),
        })
    }
}

/// A prompt's normal pass on the device, of either architecture.
struct Pass<'a, F> {
    inner: Inner<'a, F>,
    device: &'static str,
}

enum Inner<'a, F> {
    Bert(BertTensorPass<'a, F>),
    Decoder(DecoderTensorPass<'a, F>),
}

impl<F: Real> PromptPass<F> for Pass<'_, F> {
    fn neurons(&self) -> &[Vec<F>] {
        match &self.inner {
            Inner::Bert(p) => p.host().0,
            Inner::Decoder(p) => p.host().0,
        }
    }

    fn probabilities(&self) -> &[F] {
        match &self.inner {
            Inner::Bert(p) => p.host().1,
            Inner::Decoder(p) => p.host().1,
        }
    }

    fn cache_bytes_per_point(&self) -> usize {
        match &self.inner {
            Inner::Bert(p) => p.bytes_per_point(),
            Inner::Decoder(p) => p.bytes_per_point(),
        }
    }

    fn gradients(
        &self,
        layers: &[usize],
        alphas: &[F],
        gold: usize,
    ) -> Result<Vec<LayerGradients<F>>> {
        assert!(
            layers.windows(2).all(|w| w[0] < w[1]),
            "layers ascending, distinct"
        );
        let alphas: Vec<f64> = alphas
            .iter()
            .map(|a| a.to_f64().unwrap_or(f64::NAN))
            .collect();
        match &self.inner {
            Inner::Bert(p) => p.gradients(layers, &alphas, gold),
            Inner::Decoder(p) => p.gradients(layers, &alphas, gold),
        }
        .map_err(|e| on_device(e.into(), self.device))
    }
}

/// A device's out-of-memory error as [`Error::OutOfMemory`] (the IG loop then halves
/// its batch); any other error as it is.
fn on_device(error: Error, device: &str) -> Error {
    match error {
        Error::Candle(e) if is_out_of_memory(&e) => Error::OutOfMemory {
            device: device.to_string(),
            reason: e.to_string(),
        },
        Error::Candle(e) => match crate::model::explain_cuda_error(&format!("{e:?}")) {
            Some(why) => Error::Device(format!("{e} on {device}: {why}")),
            None => Error::Candle(e),
        },
        other => other,
    }
}

/// Whether candle's error is a device allocation failure (CUDA's driver, cuBLAS).
fn is_out_of_memory(error: &candle_core::Error) -> bool {
    let text = format!("{error:?}");
    ["OUT_OF_MEMORY", "out of memory", "ALLOC_FAILED"]
        .iter()
        .any(|s| text.contains(s))
}

#[cfg(test)]
mod tests;
