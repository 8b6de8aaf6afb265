//! Rotary position embeddings: the inverse frequencies and the `cos`/`sin` tables of the
//! Llama family, with the position scalings of `transformers`' `modeling_rope_utils.py`
//! (4.57): `linear`, `dynamic` (NTK), `yarn` and `llama3`. One place computes them, in
//! f64, for the candle forward ([`super::llama`]) and both attribution engines.
//!
//! `config.json`'s `rope_scaling` object is read by [`RopeScaling::from_json`] (the
//! type under `rope_type`, or the legacy `type`); a GGUF file's
//! `{arch}.rope.scaling.*` metadata is turned into the same object by
//! [`super::gguf`]. Any other type (`longrope`, `su`, …) is refused by name.

use std::f64::consts::PI;

use serde_json::{json, Value};

use super::config::Config;

/// A `rope_scaling` of `config.json`: how the rotary frequencies are stretched past the
/// context the model was trained on. `None` in [`Config::rope_scaling`] (or
/// `rope_type` `"default"`) is plain rotary positions.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `linear`: positions divided by `factor` (every inverse frequency divided by it).
    Linear {
        /// The divisor of the positions.
        factor: f64,
    },
    /// `dynamic` (NTK-aware): for a sequence of `seq` tokens longer than
    /// `max_position_embeddings`, the base becomes
    /// `θ·((factor·seq / max_position_embeddings) − (factor − 1))^(d/(d−2))`; shorter
    /// sequences use plain rotary positions.
    Dynamic {
        /// The scaling factor.
        factor: f64,
    },
    /// `yarn`: inverse frequencies blended between interpolated (÷ factor) and
    /// extrapolated (unchanged) by a linear ramp over the dimensions between the
    /// correction range of `beta_fast` and `beta_slow` rotations, and `cos`, `sin`
    /// multiplied by the attention factor.
    Yarn {
        /// The scaling factor.
        factor: f64,
        /// The context the model was trained on (default `max_position_embeddings`).
        original_max_position_embeddings: Option<usize>,
        /// The factor on `cos` and `sin`; by default from `factor` (and `mscale`,
        /// `mscale_all_dim`): `0.1·ln(factor) + 1`.
        attention_factor: Option<f64>,
        /// Rotations that bound the extrapolated dimensions (default 32).
        beta_fast: f64,
        /// Rotations that bound the interpolated dimensions (default 1).
        beta_slow: f64,
        /// DeepSeek's `mscale` (used with `mscale_all_dim`).
        mscale: Option<f64>,
        /// DeepSeek's `mscale_all_dim` (used with `mscale`).
        mscale_all_dim: Option<f64>,
        /// Whether the correction range is rounded outwards to whole dimensions
        /// (default true).
        truncate: bool,
    },
    /// `llama3` (Llama 3.1 and later): wavelengths longer than
    /// `original_max_position_embeddings / low_freq_factor` divided by `factor`, shorter
    /// than `… / high_freq_factor` unchanged, smoothly interpolated in between.
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Bounds the low-frequency band.
        low_freq_factor: f64,
        /// Bounds the high-frequency band.
        high_freq_factor: f64,
        /// The context the model was trained on.
        original_max_position_embeddings: usize,
    },
}

/// A number field of the `rope_scaling` object, if present (and not null).
fn number(object: &serde_json::Map<String, Value>, key: &str) -> Result<Option<f64>, String> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(format!("rope_scaling.{key} {v} is not a number")),
        },
    }
}

/// A positive number field that must be present.
fn required(object: &serde_json::Map<String, Value>, kind: &str, key: &str) -> Result<f64, String> {
    let x =
        number(object, key)?.ok_or_else(|| format!("rope_scaling of type {kind:?} needs {key}"))?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err(format!("rope_scaling.{key} {x} must be positive"))
    }
}

/// A positive whole number field (a context length), if present.
fn length(object: &serde_json::Map<String, Value>, key: &str) -> Result<Option<usize>, String> {
    match number(object, key)? {
        None => Ok(None),
        Some(x) if x >= 1.0 && x.fract() == 0.0 && x <= (1u64 << 40) as f64 => Ok(Some(x as usize)),
        Some(x) => Err(format!(
            "rope_scaling.{key} {x} is not a positive whole number"
        )),
    }
}

impl RopeScaling {
    /// Reads `config.json`'s `rope_scaling` (`null`, absent, or type `"default"`: none).
    /// The type is `rope_type`, or the legacy `type`; any type other than `linear`,
    /// `dynamic`, `yarn` and `llama3` is refused by name.
    pub fn from_json(value: Option<&Value>) -> Result<Option<Self>, String> {
        let object = match value {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(o)) => o,
            Some(v) => return Err(format!("rope_scaling {v} is not an object")),
        };
        let kind = match object.get("rope_type").or_else(|| object.get("type")) {
            Some(Value::String(s)) => s.as_str(),
            Some(v) => return Err(format!("rope_scaling type {v} is not a string")),
            None => return Err("rope_scaling has no rope_type (or type)".into()),
        };
        let factor = || required(object, kind, "factor");
        Ok(Some(match kind {
            "default" => return Ok(None),
            "linear" => Self::Linear { factor: factor()? },
            "dynamic" => Self::Dynamic { factor: factor()? },
            "yarn" => {
                // transformers: `beta_fast or 32`, `beta_slow or 1` (0 means the default).
                let beta = |key: &str, default: f64| -> Result<f64, String> {
                    Ok(number(object, key)?
                        .filter(|&b| b != 0.0)
                        .unwrap_or(default))
                };
                Self::Yarn {
                    factor: factor()?,
                    original_max_position_embeddings: length(
                        object,
                        "original_max_position_embeddings",
                    )?,
                    attention_factor: number(object, "attention_factor")?,
                    beta_fast: beta("beta_fast", 32.0)?,
                    beta_slow: beta("beta_slow", 1.0)?,
                    mscale: number(object, "mscale")?,
                    mscale_all_dim: number(object, "mscale_all_dim")?,
                    truncate: match object.get("truncate") {
                        None | Some(Value::Null) => true,
                        Some(Value::Bool(b)) => *b,
                        Some(v) => return Err(format!("rope_scaling.truncate {v} is not a bool")),
                    },
                }
            }
            "llama3" => {
                let low_freq_factor = required(object, kind, "low_freq_factor")?;
                let high_freq_factor = required(object, kind, "high_freq_factor")?;
                if high_freq_factor <= low_freq_factor {
                    return Err(format!(
                        "rope_scaling.high_freq_factor {high_freq_factor} must be larger than \
                         low_freq_factor {low_freq_factor}"
                    ));
                }
                Self::Llama3 {
                    factor: factor()?,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: length(
                        object,
                        "original_max_position_embeddings",
                    )?
                    .ok_or(
                        "rope_scaling of type \"llama3\" needs original_max_position_embeddings",
                    )?,
                }
            }
            other => {
                return Err(format!(
                    "rope_scaling type {other:?} in config.json is not supported (kn implements \
                     default, linear, dynamic, yarn and llama3)"
                ))
            }
        }))
    }

    /// The `rope_scaling` object of `config.json` (with `rope_type`).
    pub fn to_json(&self) -> Value {
        match self {
            Self::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            Self::Dynamic { factor } => json!({"rope_type": "dynamic", "factor": factor}),
            Self::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let mut v = json!({
                    "rope_type": "yarn", "factor": factor, "beta_fast": beta_fast,
                    "beta_slow": beta_slow, "truncate": truncate,
                });
                let o = v.as_object_mut().expect("an object");
                for (key, value) in [
                    (
                        "original_max_position_embeddings",
                        original_max_position_embeddings.map(|x| json!(x)),
                    ),
                    ("attention_factor", attention_factor.map(|x| json!(x))),
                    ("mscale", mscale.map(|x| json!(x))),
                    ("mscale_all_dim", mscale_all_dim.map(|x| json!(x))),
                ] {
                    if let Some(value) = value {
                        o.insert(key.into(), value);
                    }
                }
                v
            }
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        }
    }

    /// The type's name, as `rope_type` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Linear { .. } => "linear",
            Self::Dynamic { .. } => "dynamic",
            Self::Yarn { .. } => "yarn",
            Self::Llama3 { .. } => "llama3",
        }
    }

    /// Whether the frequencies depend on the sequence's length (`dynamic`).
    pub fn depends_on_length(&self) -> bool {
        matches!(self, Self::Dynamic { .. })
    }

    /// The longest prompt, in tokens, for a model of `max_position_embeddings`: that,
    /// except with `dynamic`, whose point is to run past it (up to `factor` times).
    pub fn max_tokens(&self, max_position_embeddings: usize) -> usize {
        match self {
            Self::Dynamic { factor } => ((max_position_embeddings as f64 * factor).floor()
                as usize)
                .max(max_position_embeddings),
            _ => max_position_embeddings,
        }
    }
}

/// What the rotary tables depend on: the head width, the base, the scaling and (for
/// `dynamic` and `yarn`'s default) `max_position_embeddings`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    /// Width of one attention head (every dimension rotates).
    pub head_dim: usize,
    /// The base θ of the frequencies (`rope_theta`).
    pub theta: f64,
    /// The position scaling, if any.
    pub scaling: Option<RopeScaling>,
    /// `max_position_embeddings` of the config.
    pub max_position_embeddings: usize,
}

impl Rope {
    /// The rotary parameters of a Llama-family config.
    pub fn of(config: &Config) -> Self {
        Self {
            head_dim: config.head_dim(),
            theta: config.rope_theta,
            scaling: config.rope_scaling.clone(),
            max_position_embeddings: config.max_position_embeddings,
        }
    }

    /// The `head_dim / 2` inverse frequencies for a forward pass over `seq` tokens
    /// (positions `0..seq`), and the factor on `cos` and `sin` (1 except with `yarn`):
    /// transformers' `ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len)`, in f64.
    /// With `dynamic`, `seq` decides the base as in one fresh forward pass over the
    /// whole sequence (transformers' `dynamic_rope_update` with no earlier, longer
    /// sequence cached).
    pub fn inverse_frequencies(&self, seq: usize) -> (Vec<f64>, f64) {
        let dim = self.head_dim;
        let plain = |base: f64| -> Vec<f64> {
            (0..dim / 2)
                .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
                .collect()
        };
        let Some(scaling) = &self.scaling else {
            return (plain(self.theta), 1.0);
        };
        match *scaling {
            RopeScaling::Linear { factor } => (
                plain(self.theta).into_iter().map(|f| f / factor).collect(),
                1.0,
            ),
            RopeScaling::Dynamic { factor } => {
                let max = self.max_position_embeddings as f64;
                let seq = (seq as f64).max(max);
                let d = dim as f64;
                let base = self.theta * ((factor * seq / max) - (factor - 1.0)).powf(d / (d - 2.0));
                (plain(base), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                    // transformers: `if mscale and mscale_all_dim` (0 counts as absent).
                    (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                        get_mscale(factor, m) / get_mscale(factor, all)
                    }
                    _ => get_mscale(factor, 1.0),
                });
                let original =
                    original_max_position_embeddings.unwrap_or(self.max_position_embeddings);
                let (d, base) = (dim as f64, self.theta);
                let correction_dim = |rotations: f64| {
                    (d * (original as f64 / (rotations * 2.0 * PI)).ln()) / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
                if low == high {
                    high += 0.001; // transformers: "prevent singularity"
                }
                let inv = (0..dim / 2)
                    .map(|i| {
                        let pos_freq = base.powf((2 * i) as f64 / d);
                        let (extrapolation, interpolation) =
                            (1.0 / pos_freq, 1.0 / (factor * pos_freq));
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_factor)
                            + extrapolation * extrapolation_factor
                    })
                    .collect();
                (inv, attention)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                let inv = plain(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
        }
    }

    /// `cos` and `sin` of the rotary angles `[seq, head_dim]` for positions `0..seq`, in
    /// the layout of `transformers`' `rotate_half` (each frequency twice, halves
    /// concatenated), times the attention factor. Computed in f64 for the positions
    /// asked for only (no table of every position).
    pub fn tables(&self, seq: usize) -> (Vec<f64>, Vec<f64>) {
        self.tables_of(seq, seq)
    }

    /// [`Rope::tables`] of positions `0..positions` with the frequencies of a sequence
    /// of `seq` tokens: a right-padded row of `seq` real tokens in a batch of
    /// `positions` (only `dynamic` depends on `seq`).
    pub fn tables_of(&self, seq: usize, positions: usize) -> (Vec<f64>, Vec<f64>) {
        let d = self.head_dim;
        let half = d / 2;
        let (inv_freq, scale) = self.inverse_frequencies(seq);
        let mut cos = vec![0f64; positions * d];
        let mut sin = vec![0f64; positions * d];
        for p in 0..positions {
            for (i, f) in inv_freq.iter().enumerate() {
                let angle = p as f64 * f;
                for j in [i, i + half] {
                    cos[p * d + j] = angle.cos() * scale;
                    sin[p * d + j] = angle.sin() * scale;
                }
            }
        }
        (cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(scaling: Value, head_dim: usize, theta: f64, max: usize) -> Rope {
        Rope {
            head_dim,
            theta,
            scaling: RopeScaling::from_json(Some(&scaling)).unwrap(),
            max_position_embeddings: max,
        }
    }

    fn assert_close(name: &str, got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-14 * w.abs(),
                "{name}[{i}]: {g:e} vs transformers {w:e}"
            );
        }
    }
    /// transformers 4.57.6's own ROPE_INIT_FUNCTIONS in float64 (printed by
    /// scripts/golden/rope_inv_freq.py): (name, head_dim, θ, max_position_embeddings,
    /// rope_scaling, seq, attention factor, inverse frequencies).
    #[allow(clippy::type_complexity)]
    fn transformers_cases() -> Vec<(&'static str, usize, f64, usize, Value, usize, f64, Vec<f64>)> {
        vec![
            (
                "default",
                16,
                10000.0,
                64,
                json!(null),
                1,
                1.0,
                vec![
                    1.0,
                    0.31622776601683794,
                    0.1,
                    0.03162277660168379,
                    0.01,
                    0.003162277660168379,
                    0.001,
                    0.00031622776601683794,
                ],
            ),
            (
                "linear",
                16,
                10000.0,
                64,
                json!({"rope_type": "linear", "factor": 4.0}),
                1,
                1.0,
                vec![
                    0.25,
                    0.07905694150420949,
                    0.025,
                    0.007905694150420948,
                    0.0025,
                    0.0007905694150420947,
                    0.00025,
                    7.905694150420948e-05,
                ],
            ),
            (
                "linear_legacy_type",
                16,
                10000.0,
                64,
                json!({"type": "linear", "factor": 2.5}),
                1,
                1.0,
                vec![
                    0.4,
                    0.12649110640673517,
                    0.04,
                    0.012649110640673516,
                    0.004,
                    0.0012649110640673515,
                    0.0004,
                    0.00012649110640673518,
                ],
            ),
            (
                "dynamic_short",
                16,
                10000.0,
                16,
                json!({"rope_type": "dynamic", "factor": 4.0}),
                12,
                1.0,
                vec![
                    1.0,
                    0.31622776601683794,
                    0.1,
                    0.03162277660168379,
                    0.01,
                    0.003162277660168379,
                    0.001,
                    0.00031622776601683794,
                ],
            ),
            (
                "dynamic_long",
                16,
                10000.0,
                16,
                json!({"rope_type": "dynamic", "factor": 4.0}),
                40,
                1.0,
                vec![
                    1.0,
                    0.2394813560059838,
                    0.05735131987446476,
                    0.013734571852269752,
                    0.003289173891343177,
                    0.0007876958236383426,
                    0.00018863846396516057,
                    4.517539514526257e-05,
                ],
            ),
            (
                "yarn",
                16,
                10000.0,
                64,
                json!({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16}),
                1,
                1.2079441541679836,
                vec![
                    1.0,
                    0.03952847075210474,
                    0.0125,
                    0.003952847075210474,
                    0.00125,
                    0.00039528470752104737,
                    0.000125,
                    3.952847075210474e-05,
                ],
            ),
            (
                "yarn_options",
                16,
                10000.0,
                64,
                json!({"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 0.5, "truncate": false}),
                1,
                1.0648216253695715,
                vec![
                    1.0,
                    0.14849024701094485,
                    0.025,
                    0.007905694150420948,
                    0.0025,
                    0.0007905694150420947,
                    0.00025,
                    7.905694150420948e-05,
                ],
            ),
            (
                "yarn_attention_factor",
                64,
                1000000.0,
                131072,
                json!({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, "attention_factor": 1.25}),
                1,
                1.25,
                vec![
                    1.0,
                    0.6493816315762113,
                    0.4216965034285823,
                    0.27384196342643613,
                    0.17782794100389226,
                    0.1154781984689458,
                    0.07498942093324558,
                    0.04869675251658631,
                    0.03162277660168379,
                    0.02053525026457146,
                    0.01333521432163324,
                    0.008659643233600653,
                    0.005154795480911533,
                    0.003043117727123648,
                    0.0017785302792462413,
                    0.0010266176840396614,
                    0.0005833333333333333,
                    0.0003246908157881056,
                    0.00017570687642857595,
                    9.128065447547873e-05,
                    4.445698525097307e-05,
                    2.8869549617236455e-05,
                    1.8747355233311396e-05,
                    1.2174188129146578e-05,
                    7.905694150420949e-06,
                    5.133812566142866e-06,
                    3.33380358040831e-06,
                    2.1649108084001634e-06,
                    1.4058533129758728e-06,
                    9.129353181370943e-07,
                    5.928434264154138e-07,
                    3.84981631514873e-07,
                ],
            ),
            (
                "llama3_tiny",
                8,
                10000.0,
                64,
                json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
                1,
                1.0,
                vec![0.5306338726414592, 0.003125, 0.0003125, 3.125e-05],
            ),
            (
                "llama3_2",
                64,
                500000.0,
                131072,
                json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
                1,
                1.0,
                vec![
                    1.0,
                    0.6636012376960885,
                    0.44036660267178046,
                    0.2922278225730151,
                    0.19392274474868576,
                    0.12868737343265052,
                    0.08539710028576561,
                    0.056669621445291044,
                    0.03760603093086393,
                    0.024955408670558694,
                    0.016560440080994446,
                    0.010989528534539826,
                    0.0072926647372171085,
                    0.004839421345719893,
                    0.0032114459947525913,
                    0.0012905479282092638,
                    0.00042955679655936815,
                    9.70828780262767e-05,
                    1.9461638184831125e-05,
                    1.291476718704739e-05,
                    8.570255489881478e-06,
                    5.687232150457046e-06,
                    3.7740542941082826e-06,
                    2.5044671007024935e-06,
                    1.661967467795309e-06,
                    1.102883668639601e-06,
                    7.318749675440419e-07,
                    4.856731343010108e-07,
                    3.2229329303788936e-07,
                    2.138742281610915e-07,
                    1.4192720251899592e-07,
                    9.418306725434909e-08,
                ],
            ),
        ]
    }

    /// Every rope type's inverse frequencies and attention factor equal transformers'
    /// (float64) to 1e-14 relative; the tables are cos/sin of position × frequency
    /// times the attention factor.
    #[test]
    fn inverse_frequencies_equal_transformers() {
        for (name, head_dim, theta, max, scaling, seq, attention, want) in transformers_cases() {
            let rope = rope(scaling, head_dim, theta, max);
            let (inv, factor) = rope.inverse_frequencies(seq);
            assert_close(name, &inv, &want);
            assert!(
                (factor - attention).abs() <= 1e-15,
                "{name}: {factor} vs {attention}"
            );
            let (cos, sin) = rope.tables(seq.max(3));
            let (p, i, d) = (2, head_dim / 2 - 1, head_dim);
            for j in [i, i + d / 2] {
                let angle = p as f64 * want[i];
                assert!(
                    (cos[p * d + j] - angle.cos() * attention).abs() < 1e-14,
                    "{name}"
                );
                assert!(
                    (sin[p * d + j] - angle.sin() * attention).abs() < 1e-14,
                    "{name}"
                );
            }
        }
    }

    /// `rope_type` `"default"` and null are no scaling; each type reads back from its
    /// own JSON; unknown types are refused by name, as are llama3 without its fields.
    #[test]
    fn rope_scaling_parses_round_trips_and_refuses_unknown_types() {
        assert_eq!(RopeScaling::from_json(None), Ok(None));
        assert_eq!(RopeScaling::from_json(Some(&Value::Null)), Ok(None));
        assert_eq!(
            RopeScaling::from_json(Some(&json!({"rope_type": "default"}))),
            Ok(None)
        );
        for (_, _, _, _, scaling, ..) in transformers_cases() {
            let Some(parsed) = RopeScaling::from_json(Some(&scaling)).unwrap() else {
                continue;
            };
            let again = RopeScaling::from_json(Some(&parsed.to_json())).unwrap();
            assert_eq!(again, Some(parsed));
        }
        for (scaling, wanted) in [
            (
                json!({"rope_type": "longrope", "factor": 4.0}),
                "\"longrope\" in config.json",
            ),
            (
                json!({"type": "su", "factor": 4.0}),
                "\"su\" in config.json",
            ),
            (json!({"type": "linear"}), "needs factor"),
            (
                json!({"rope_type": "dynamic", "factor": -2}),
                "must be positive",
            ),
            (json!({"factor": 2.0}), "no rope_type"),
            (
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0}),
                "needs original_max_position_embeddings",
            ),
            (
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                       "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
                "must be larger than low_freq_factor",
            ),
        ] {
            let err = RopeScaling::from_json(Some(&scaling)).unwrap_err();
            assert!(err.contains(wanted), "{scaling}: {err}");
        }
    }

    /// A padded row's tables: its own length's frequencies (dynamic), every position.
    #[test]
    fn tables_of_a_padded_row_use_its_own_length() {
        let dynamic = rope(
            json!({"rope_type": "dynamic", "factor": 4.0}),
            16,
            10000.0,
            16,
        );
        let (alone, _) = dynamic.tables(12);
        let (padded, _) = dynamic.tables_of(12, 40);
        assert_eq!(padded.len(), 40 * 16);
        assert_eq!(&padded[..12 * 16], &alone[..]);
        let (long, _) = dynamic.tables(40);
        assert_ne!(&long[..12 * 16], &alone[..], "40 tokens: another base");
    }

    /// `dynamic` takes prompts up to factor × max_position_embeddings; the others up to
    /// max_position_embeddings.
    #[test]
    fn dynamic_scaling_takes_longer_prompts() {
        assert_eq!(RopeScaling::Dynamic { factor: 4.0 }.max_tokens(16), 64);
        assert_eq!(RopeScaling::Linear { factor: 4.0 }.max_tokens(16), 16);
    }
}
