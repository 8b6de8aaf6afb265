//! The device-generic attribution engine: the algorithm of the flat engines
//! ([`super::bert`], [`super::decoder`]) in candle tensor ops, so that it runs wherever
//! candle does — on an NVIDIA GPU with `--features cuda` (cuBLAS products, candle's
//! kernels), or on the CPU for checking one against the other (`--engine tensor`).
//!
//! It implements the same [`PromptPass`] as the flat engines, so the integrated-gradients
//! loop ([`super::ig`]) is shared, and [`PromptPasses`] jointly: one batch holds the
//! points of several prompts of a fact (each prompt's rows a block of their own, its
//! attention over its own sequence, the dense products on all rows at once). The
//! architectures are in [`bert`] and [`decoder`], their kernels in [`ops`]. Backward passes are written by hand: nothing is
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

use super::engine::{LayerGradients, PromptPass, PromptPasses, Real, Request};
use bert::BertTensorEngine;
use decoder::DecoderTensorEngine;

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
        let on = |e| on_device(e, self.device);
        Ok(match &self.kind {
            Kind::Bert(e) => Box::new(OnDevice(e.prepare(ids, position).map_err(on)?)),
            Kind::Decoder(e) => Box::new(OnDevice(e.prepare(ids, position).map_err(on)?)),
        })
    }

    /// The normal passes of several prompts (token ids, answer position), whose
    /// integration points go to the device together: one batch holds the points of
    /// several prompts (on a GPU, fuller batches and fewer passes).
    pub fn prepare_all(
        &self,
        prompts: &[(&[u32], usize)],
    ) -> Result<Box<dyn PromptPasses<F> + '_>> {
        Ok(match &self.kind {
            Kind::Bert(e) => Box::new(self.passes(prompts, |ids, p| e.prepare(ids, p))?),
            Kind::Decoder(e) => Box::new(self.passes(prompts, |ids, p| e.prepare(ids, p))?),
        })
    }

    /// Each prompt's pass by `prepare`, device errors explained.
    fn passes<P>(
        &self,
        prompts: &[(&[u32], usize)],
        prepare: impl Fn(&[u32], usize) -> Result<P>,
    ) -> Result<TensorPasses<P>> {
        let passes = prompts
            .iter()
            .map(|&(ids, position)| {
                let pass = prepare(ids, position).map_err(|e| on_device(e, self.device))?;
                Ok(OnDevice(pass))
            })
            .collect::<Result<_>>()?;
        Ok(TensorPasses(passes))
    }
}

/// What the tensor engines' passes have in common: their host copies, and their
/// engine's stacked integration of several requests (each of one of its passes).
trait TensorPass<F: Real>: Sync + Sized {
    /// The normal pass's neurons and probabilities on the host.
    fn host(&self) -> (&[Vec<F>], &[F]);
    /// [`PromptPass::cache_bytes_per_point`].
    fn bytes_per_point(&self) -> usize;
    /// The engine's device, by name.
    fn device_name(&self) -> &'static str;
    /// The engine's joint gradients (`requests` not empty, all on one engine).
    fn joint(
        requests: &[(&Self, &[usize], &[f64])],
        gold: usize,
    ) -> candle_core::Result<Vec<Vec<LayerGradients<F>>>>;
}

/// Several requests to the passes `of`, as the engines take them, checking what
/// [`PromptPass::gradients`] promises of their layers.
fn run_joint<'p, F: Real, P: TensorPass<F> + 'p>(
    of: impl Fn(usize) -> &'p P,
    requests: &[Request<'_, F>],
    gold: usize,
) -> Result<Vec<Vec<LayerGradients<F>>>> {
    let Some(first) = requests.first() else {
        return Ok(Vec::new());
    };
    let alphas: Vec<Vec<f64>> = requests
        .iter()
        .map(|r| {
            assert!(
                r.layers.windows(2).all(|w| w[0] < w[1]),
                "layers ascending, distinct"
            );
            r.alphas
                .iter()
                .map(|a| a.to_f64().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    let stacked: Vec<(&P, &[usize], &[f64])> = requests
        .iter()
        .zip(&alphas)
        .map(|(r, a)| (of(r.prompt), r.layers, &a[..]))
        .collect();
    P::joint(&stacked, gold).map_err(|e| on_device(e.into(), of(first.prompt).device_name()))
}

/// A tensor engine's pass as a [`PromptPass`].
struct OnDevice<P>(P);

impl<F: Real, P: TensorPass<F>> PromptPass<F> for OnDevice<P> {
    fn neurons(&self) -> &[Vec<F>] {
        self.0.host().0
    }

    fn probabilities(&self) -> &[F] {
        self.0.host().1
    }

    fn cache_bytes_per_point(&self) -> usize {
        self.0.bytes_per_point()
    }

    fn gradients(
        &self,
        layers: &[usize],
        alphas: &[F],
        gold: usize,
    ) -> Result<Vec<LayerGradients<F>>> {
        let request = Request {
            prompt: 0,
            layers,
            alphas,
        };
        let mut out = run_joint(|_| &self.0, &[request], gold)?;
        Ok(out.pop().expect("one request"))
    }
}

/// A fact's prompts on the device, evaluated jointly.
struct TensorPasses<P>(Vec<OnDevice<P>>);

impl<F: Real, P: TensorPass<F>> PromptPasses<F> for TensorPasses<P> {
    fn prompts(&self) -> usize {
        self.0.len()
    }

    fn pass(&self, prompt: usize) -> &dyn PromptPass<F> {
        &self.0[prompt]
    }

    fn joint(&self) -> bool {
        true
    }

    fn gradients(
        &self,
        requests: &[Request<'_, F>],
        gold: usize,
    ) -> Result<Vec<Vec<LayerGradients<F>>>> {
        run_joint(|prompt| &self.0[prompt].0, requests, gold)
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
