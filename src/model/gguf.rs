//! GGUF files (llama.cpp's checkpoint format) read as Hugging Face checkpoints: the
//! `config.json` fields, every tensor under its Hugging Face name and in its Hugging Face
//! layout (dequantized to f32), and the tokenizer, as transformers 4.47.1's GGUF loader
//! builds them (`modeling_gguf_pytorch_utils.py`, `integrations/ggml.py`).
//!
//! The file is first checked by a small bounded parser of its own (magic, version, counts,
//! lengths, value types, tensor shapes, types and data ranges, each against what the file
//! can hold), and only then handed to candle's GGUF reader, which trusts many of those
//! numbers. A corrupt file is an [`Error::Model`], never a panic or an unbounded
//! allocation: what is allocated is bounded by a small multiple of the file's size (candle
//! keeps each metadata array element as a 32-byte value).
//!
//! Architectures: `llama` (also Mistral-style files), `qwen2` and `gpt2`. llama.cpp's
//! converter permutes the rows of the `llama` q/k projections for its rotary embedding;
//! they are permuted back here, as transformers does. GPT-2's projections are stored
//! transposed (nn.Linear layout) and are transposed back to Hugging Face's Conv1D
//! `[in, out]` layout.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::json;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// A GGUF file read as a Hugging Face checkpoint.
pub struct GgufCheckpoint {
    /// `general.architecture` as found ("llama", "qwen2", "gpt2", ...).
    pub architecture: String,
    /// The equivalent of config.json, with Hugging Face field names.
    pub config: serde_json::Value,
    /// Every tensor under its Hugging Face name, dequantized to f32 on the CPU, in the
    /// Hugging Face layout (q/k rows un-permuted, GPT-2 Conv1D weights `[in, out]`), in
    /// the file's order.
    pub tensors: Vec<(String, Tensor)>,
    /// The tokenizer built from the `tokenizer.ggml.*` metadata.
    pub tokenizer: Tokenizer,
    /// How many tensors of each GGUF type the file holds, most frequent first, e.g.
    /// `[("q4_1", 182), ("f32", 61)]`.
    pub tensor_types: Vec<(String, usize)>,
}

impl std::fmt::Debug for GgufCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufCheckpoint")
            .field("architecture", &self.architecture)
            .field("config", &self.config)
            .field("tensors", &self.tensors.len())
            .field("tensor_types", &self.tensor_types)
            .finish_non_exhaustive()
    }
}

/// Reads the GGUF file at `path`: checks it, dequantizes every tensor to f32 under its
/// Hugging Face name and builds the config and the tokenizer.
///
/// Errors ([`Error::Model`] naming the file) for anything wrong with the file: a corrupt
/// or truncated header, a tensor type kn cannot dequantize (naming the type and the
/// tensor), an unsupported architecture, tokenizer model or rope scaling, a missing
/// metadata key (naming it), a missing, unknown or mis-shaped tensor (naming it).
pub fn read(path: &Path) -> Result<GgufCheckpoint> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    let layout = scan(&mut reader, len)
        .map_err(|reason| Error::model(path, format!("not a valid GGUF file: {reason}")))?;
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
    let content = guarded(path, "cannot read the GGUF header", || {
        Content::read(&mut reader)
    })?;
    if content.tensor_infos.len() != layout.tensors.len() {
        return Err(Error::model(
            path,
            format!(
                "candle read {} tensor infos, the file declares {}",
                content.tensor_infos.len(),
                layout.tensors.len()
            ),
        ));
    }
    let meta = Meta {
        map: &content.metadata,
        path,
    };
    let architecture = meta.string_req("general.architecture")?.to_string();
    let arch = match architecture.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "gpt2" => Arch::Gpt2,
        other => {
            return Err(Error::model(
                path,
                format!("GGUF architecture {other:?} is not supported (llama, qwen2, gpt2)"),
            ))
        }
    };
    let hp = Hparams::read(&meta, arch, &architecture)?;
    let vocab = TokenizerMeta::read(&meta)?;
    let tokenizer = build_tokenizer(&vocab, arch).map_err(|reason| Error::model(path, reason))?;

    // Map every tensor name before reading any data, so that an unknown tensor fails fast.
    let mut targets = Vec::with_capacity(layout.tensors.len());
    for entry in &layout.tensors {
        if entry.name == "rope_freqs.weight" {
            return Err(Error::model(
                path,
                "tensor rope_freqs.weight holds per-frequency rotary factors (llama.cpp's form \
                 of Llama 3.1+ rope_scaling \"llama3\"), which kn does not read from GGUF \
                 files: load the Hugging Face checkpoint (config.json with rope_scaling) instead",
            ));
        }
        let target = hf_name(arch, &entry.name, hp.n_layer).ok_or_else(|| {
            Error::model(
                path,
                format!(
                    "tensor {} is not one kn knows for GGUF architecture {architecture:?}",
                    entry.name
                ),
            )
        })?;
        targets.push(target);
    }

    let mut loaded: Vec<Loaded> = Vec::with_capacity(layout.tensors.len());
    for (entry, target) in layout.tensors.iter().zip(targets) {
        let Some((hf, fix)) = target else { continue };
        let what = format!("cannot read tensor {}", entry.name);
        let qtensor = guarded(path, &what, || {
            content.tensor(&mut reader, &entry.name, &Device::Cpu)
        })?;
        let tensor = guarded(path, &what, || {
            qtensor.dequantize(&Device::Cpu)?.to_dtype(DType::F32)
        })?;
        loaded.push(Loaded {
            gguf: entry.name.clone(),
            hf,
            fix,
            tensor,
        });
    }

    let embd = loaded
        .iter()
        .find(|t| t.gguf == "token_embd.weight")
        .ok_or_else(|| Error::model(path, "tensor token_embd.weight is missing"))?;
    let vocab_size = match embd.tensor.dims() {
        [rows, _] => *rows,
        dims => {
            return Err(Error::model(
                path,
                format!("tensor token_embd.weight has shape {dims:?}, expected [vocab, hidden]"),
            ))
        }
    };
    if vocab.tokens.len() != vocab_size {
        return Err(Error::model(
            path,
            format!(
                "token_embd.weight has {vocab_size} rows but tokenizer.ggml.tokens has {} tokens",
                vocab.tokens.len()
            ),
        ));
    }
    if let Some(declared) = meta.usize_opt(&format!("{architecture}.vocab_size"))? {
        if declared != vocab_size {
            return Err(Error::model(
                path,
                format!(
                    "{architecture}.vocab_size is {declared} but token_embd.weight has \
                     {vocab_size} rows"
                ),
            ));
        }
    }

    // GPT-2: llama.cpp's converter writes the (tied) token embedding a second time as
    // output.weight; a Hugging Face GPT-2 checkpoint has no lm_head.weight then.
    if arch == Arch::Gpt2 {
        if let Some(i) = loaded.iter().position(|t| t.gguf == "output.weight") {
            if same_values(&loaded[i].tensor, &embd.tensor) {
                loaded.remove(i);
            }
        }
    }
    let tied = !loaded.iter().any(|t| t.gguf == "output.weight");

    for t in &mut loaded {
        if t.fix == Fix::Transpose && t.tensor.rank() == 2 {
            t.tensor = guarded(path, &format!("cannot transpose {}", t.gguf), || {
                t.tensor.t()?.contiguous()
            })?;
        }
    }
    check_shapes(path, arch, &hp, vocab_size, tied, &loaded)?;
    for t in &mut loaded {
        let n_head = match t.fix {
            Fix::UnpermuteQ => hp.n_head,
            Fix::UnpermuteK => hp.n_kv_head,
            _ => continue,
        };
        t.tensor = guarded(path, &format!("cannot un-permute {}", t.gguf), || {
            unpermute_rows(&t.tensor, n_head)
        })?;
    }

    let config = hp.config(arch, vocab_size, tied, &vocab, &loaded);

    let mut counts: HashMap<&'static str, usize> = HashMap::new();
    for entry in &layout.tensors {
        *counts.entry(entry.type_name).or_default() += 1;
    }
    let mut tensor_types: Vec<(String, usize)> = counts
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    tensor_types.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));

    Ok(GgufCheckpoint {
        architecture,
        config,
        tensors: loaded.into_iter().map(|t| (t.hf, t.tensor)).collect(),
        tokenizer,
        tensor_types,
    })
}

/// Runs one candle call, turning its error, or a panic, into an error naming the file.
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> candle_core::Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::model(path, format!("{what}: {e}"))),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::model(
                path,
                format!("{what}: candle panicked: {msg}"),
            ))
        }
    }
}

/// Whether two tensors have the same shape and bit-identical values.
fn same_values(a: &Tensor, b: &Tensor) -> bool {
    if a.dims() != b.dims() {
        return false;
    }
    match (
        a.flatten_all().and_then(|t| t.to_vec1::<f32>()),
        b.flatten_all().and_then(|t| t.to_vec1::<f32>()),
    ) {
        (Ok(a), Ok(b)) => a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        _ => false,
    }
}

/// Undoes llama.cpp's `permute` of q/k rows (convert_hf_to_gguf.py, `LlamaModel.permute`)
/// as transformers' `reverse_permute_weights` does: rows viewed as
/// `[n_head, head_dim / 2, 2]` become `[n_head, 2, head_dim / 2]`.
fn unpermute_rows(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims.first().copied().unwrap_or(0);
    let rest: usize = dims.iter().skip(1).product();
    if n_head == 0 || rows % (2 * n_head) != 0 {
        candle_core::bail!("{rows} rows do not split into {n_head} heads of pairs")
    }
    let half = rows / n_head / 2;
    t.reshape((n_head, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

// ---------------------------------------------------------------------------------------
// The bounded pre-parse.

/// What the pre-parse keeps of the header: the tensors, in the file's order.
struct Layout {
    tensors: Vec<TensorEntry>,
}

/// One tensor info, as checked.
struct TensorEntry {
    /// The name as candle reads it (trailing NULs dropped, lossy UTF-8).
    name: String,
    /// The GGUF type's name ("q4_1").
    type_name: &'static str,
}

/// Nesting depth of metadata arrays the pre-parse accepts (an array of arrays at most).
const MAX_ARRAY_DEPTH: usize = 2;

/// Reads the header from `r` (positioned at the file's start, `len` bytes long) and checks
/// every count, length, type, shape and data range against what the file can hold.
fn scan<R: Read>(r: R, len: u64) -> std::result::Result<Layout, String> {
    let mut s = Scan { r, pos: 0, len };
    let magic: [u8; 4] = s.array("the magic")?;
    if &magic != b"GGUF" {
        return Err(format!("the file starts with {magic:?}, not \"GGUF\""));
    }
    let version = s.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2, 3)"));
    }
    let n_tensors = s.u64("the tensor count")?;
    let n_kv = s.u64("the metadata count")?;
    // A metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes, a tensor info
    // 8 (name length) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset).
    let needed = n_kv
        .saturating_mul(13)
        .saturating_add(n_tensors.saturating_mul(32));
    if needed > s.left() {
        return Err(format!(
            "the header declares {n_tensors} tensors and {n_kv} metadata entries, which need \
             at least {needed} bytes; the file has {} left",
            s.left()
        ));
    }

    let mut keys = HashSet::new();
    let mut alignment: u64 = 32;
    for i in 0..n_kv {
        let key = s.string(&format!("the key of metadata entry {i}"))?;
        let ty = s.u32(&format!("the type of metadata {key}"))?;
        if key == "general.alignment" {
            alignment = s.alignment(ty)?;
        } else {
            s.skip_value(ty, 0, &key)?;
        }
        if !keys.insert(key.clone()) {
            return Err(format!("metadata key {key} appears twice"));
        }
    }

    let mut names = HashSet::new();
    let mut infos = Vec::new();
    for i in 0..n_tensors {
        let name = s.string(&format!("the name of tensor {i}"))?;
        let n_dims = s.u32(&format!("the dimension count of tensor {name}"))?;
        if !(1..=4).contains(&n_dims) {
            return Err(format!("tensor {name} has {n_dims} dimensions (1 to 4)"));
        }
        let mut dims = Vec::with_capacity(4);
        for _ in 0..n_dims {
            let d = s.u64(&format!("the dimensions of tensor {name}"))?;
            if d == 0 {
                return Err(format!("tensor {name} has a zero dimension"));
            }
            dims.push(d);
        }
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&e| e <= len.saturating_mul(4))
            .ok_or_else(|| format!("tensor {name} has dimensions {dims:?}, too many elements"))?;
        let ty = s.u32(&format!("the type of tensor {name}"))?;
        let (type_name, dtype) = ggml_type(ty)
            .ok_or_else(|| format!("tensor {name} has unknown GGUF tensor type {ty}"))?;
        let dtype = dtype.ok_or_else(|| {
            format!(
                "tensor {name} has GGUF type {type_name}, which kn cannot dequantize \
                 (supported: {})",
                SUPPORTED_TYPES.join(", ")
            )
        })?;
        let offset = s.u64(&format!("the data offset of tensor {name}"))?;
        let block = dtype.block_size() as u64;
        if dims[0] % block != 0 {
            return Err(format!(
                "tensor {name} ({type_name}) has rows of {} values, not a multiple of its \
                 block size {block}",
                dims[0]
            ));
        }
        let size = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| format!("tensor {name} has dimensions {dims:?}, too many elements"))?;
        if offset % alignment != 0 {
            return Err(format!(
                "tensor {name} has data offset {offset}, not a multiple of the alignment \
                 {alignment}"
            ));
        }
        if !names.insert(name.clone()) {
            return Err(format!("tensor {name} appears twice"));
        }
        infos.push((name, type_name, offset, size));
    }

    let data_start = s
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or("the tensor data offset overflows")?;
    let mut ranges = Vec::with_capacity(infos.len());
    for (name, type_name, offset, size) in &infos {
        let end = data_start
            .checked_add(*offset)
            .and_then(|start| start.checked_add(*size))
            .filter(|&end| end <= len)
            .ok_or_else(|| {
                format!(
                    "tensor {name} ({type_name}, {size} bytes at data offset {offset}) lies \
                     beyond the end of the file ({len} bytes; data from byte {data_start})"
                )
            })?;
        ranges.push((*offset, end - data_start, name));
    }
    ranges.sort();
    for pair in ranges.windows(2) {
        if let [(_, end, a), (start, _, b)] = pair {
            if start < end {
                return Err(format!("the data of tensors {a} and {b} overlap"));
            }
        }
    }
    Ok(Layout {
        tensors: infos
            .into_iter()
            .map(|(name, type_name, _, _)| TensorEntry { name, type_name })
            .collect(),
    })
}

/// A reader that knows how many bytes the file has left and never reads past them.
struct Scan<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Scan<R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn need(&self, n: u64, what: &str) -> std::result::Result<(), String> {
        if n > self.left() {
            return Err(format!(
                "{what} needs {n} bytes at byte {}, but the file ends {} bytes later",
                self.pos,
                self.left()
            ));
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        self.need(N as u64, what)?;
        let mut buf = [0u8; N];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| format!("cannot read {what}: {e}"))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn skip(&mut self, n: u64, what: &str) -> std::result::Result<(), String> {
        self.need(n, what)?;
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())
            .map_err(|e| format!("cannot read {what}: {e}"))?;
        if copied != n {
            return Err(format!("{what}: the file ended early"));
        }
        self.pos += n;
        Ok(())
    }

    /// A length-prefixed string, read as candle reads it (trailing NULs dropped, lossy).
    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        self.need(n, what)?;
        let n = usize::try_from(n).map_err(|_| format!("{what} is too long"))?;
        let mut buf = vec![0u8; n];
        self.r
            .read_exact(&mut buf)
            .map_err(|e| format!("cannot read {what}: {e}"))?;
        self.pos += n as u64;
        while buf.last() == Some(&0) {
            buf.pop();
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// `general.alignment`, of one of the types candle reads it from.
    fn alignment(&mut self, ty: u32) -> std::result::Result<u64, String> {
        let what = "general.alignment";
        let v: i64 = match ty {
            0 => i64::from(self.array::<1>(what)?[0]),
            1 => i64::from(i8::from_le_bytes(self.array(what)?)),
            2 => i64::from(u16::from_le_bytes(self.array(what)?)),
            3 => i64::from(i16::from_le_bytes(self.array(what)?)),
            4 => i64::from(self.u32(what)?),
            5 => i64::from(i32::from_le_bytes(self.array(what)?)),
            _ => {
                return Err(format!(
                    "general.alignment has value type {ty}, not an integer"
                ))
            }
        };
        if v <= 0 || (v & (v - 1)) != 0 {
            return Err(format!("general.alignment is {v}, not a power of two"));
        }
        Ok(v as u64)
    }

    fn skip_value(&mut self, ty: u32, depth: usize, key: &str) -> std::result::Result<(), String> {
        if let Some(size) = fixed_size(ty) {
            return self.skip(size, key);
        }
        match ty {
            8 => {
                let n = self.u64(key)?;
                self.skip(n, key)
            }
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("metadata {key} nests arrays too deeply"));
                }
                let elem = self.u32(key)?;
                let min = match elem {
                    8 => 8,
                    9 => 12,
                    t => fixed_size(t)
                        .ok_or_else(|| format!("metadata {key} has unknown element type {t}"))?,
                };
                let n = self.u64(key)?;
                let needed = n.saturating_mul(min);
                if needed > self.left() {
                    return Err(format!(
                        "metadata {key} declares {n} elements, which need at least {needed} \
                         bytes; the file has {} left",
                        self.left()
                    ));
                }
                if let Some(size) = fixed_size(elem) {
                    return self.skip(n * size, key);
                }
                for _ in 0..n {
                    self.skip_value(elem, depth + 1, key)?;
                }
                Ok(())
            }
            t => Err(format!("metadata {key} has unknown value type {t}")),
        }
    }
}

/// The on-disk size of a fixed-size GGUF value type.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// The GGUF tensor types candle 0.11 can read and dequantize.
const SUPPORTED_TYPES: &[&str] = &[
    "f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k",
    "q6_k",
];

/// A GGUF (ggml) tensor type: its name, and candle's type when kn can dequantize it.
fn ggml_type(ty: u32) -> Option<(&'static str, Option<GgmlDType>)> {
    use GgmlDType as G;
    Some(match ty {
        0 => ("f32", Some(G::F32)),
        1 => ("f16", Some(G::F16)),
        2 => ("q4_0", Some(G::Q4_0)),
        3 => ("q4_1", Some(G::Q4_1)),
        6 => ("q5_0", Some(G::Q5_0)),
        7 => ("q5_1", Some(G::Q5_1)),
        8 => ("q8_0", Some(G::Q8_0)),
        // candle knows Q8_1 and Q8_K but cannot read them from a file.
        9 => ("q8_1", None),
        10 => ("q2_k", Some(G::Q2K)),
        11 => ("q3_k", Some(G::Q3K)),
        12 => ("q4_k", Some(G::Q4K)),
        13 => ("q5_k", Some(G::Q5K)),
        14 => ("q6_k", Some(G::Q6K)),
        15 => ("q8_k", None),
        16 => ("iq2_xxs", None),
        17 => ("iq2_xs", None),
        18 => ("iq3_xxs", None),
        19 => ("iq1_s", None),
        20 => ("iq4_nl", None),
        21 => ("iq3_s", None),
        22 => ("iq2_s", None),
        23 => ("iq4_xs", None),
        24 => ("i8", None),
        25 => ("i16", None),
        26 => ("i32", None),
        27 => ("i64", None),
        28 => ("f64", None),
        29 => ("iq1_m", None),
        30 => ("bf16", Some(G::BF16)),
        34 => ("tq1_0", None),
        35 => ("tq2_0", None),
        39 => ("mxfp4", None),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------
// Metadata.

/// Typed access to candle's metadata map, with errors naming the key.
struct Meta<'a> {
    map: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Meta<'_> {
    fn err(&self, reason: String) -> Error {
        Error::model(self.path, reason)
    }

    fn missing(&self, key: &str) -> Error {
        self.err(format!("GGUF metadata key {key} is missing"))
    }

    fn wrong(&self, key: &str, expected: &str, v: &Value) -> Error {
        self.err(format!(
            "GGUF metadata {key} is a {:?}, expected {expected}",
            v.value_type()
        ))
    }

    fn u64_opt(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        let n = match *v {
            Value::U8(x) => Some(u64::from(x)),
            Value::U16(x) => Some(u64::from(x)),
            Value::U32(x) => Some(u64::from(x)),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => return Err(self.wrong(key, "an integer", v)),
        };
        n.map(Some)
            .ok_or_else(|| self.err(format!("GGUF metadata {key} is negative")))
    }

    /// A count or size: an integer of at most 2^32, so that products of two fit.
    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.u64_opt(key)? {
            None => Ok(None),
            Some(n) if n <= 1 << 32 => Ok(Some(n as usize)),
            Some(n) => Err(self.err(format!("GGUF metadata {key} is {n}, implausibly large"))),
        }
    }

    fn usize_req(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.missing(key))
    }

    /// A float, as the shortest decimal that reads back as the stored value (an f32
    /// `1e-5` is 1e-5, not 9.99999974738e-06).
    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(x.to_string().parse().unwrap_or(f64::from(*x)))),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.wrong(key, "a float", v)),
        }
    }

    fn f64_req(&self, key: &str) -> Result<f64> {
        self.f64_opt(key)?.ok_or_else(|| self.missing(key))
    }

    /// A norm's epsilon: finite and not negative (NaN or infinity would make every
    /// activation NaN without an error).
    fn eps_req(&self, key: &str) -> Result<f64> {
        let eps = self.f64_req(key)?;
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(self.err(format!(
                "{key} is {eps}: a norm's epsilon must be a finite number ≥ 0"
            )));
        }
        Ok(eps)
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a bool", v)),
        }
    }

    fn string_opt(&self, key: &str) -> Result<Option<&str>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    fn string_req(&self, key: &str) -> Result<&str> {
        self.string_opt(key)?.ok_or_else(|| self.missing(key))
    }

    fn array_opt(&self, key: &str) -> Result<Option<&[Value]>> {
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong(key, "an array", v)),
        }
    }

    fn strings_opt(&self, key: &str) -> Result<Option<Vec<String>>> {
        let Some(a) = self.array_opt(key)? else {
            return Ok(None);
        };
        a.iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                v => Err(self.wrong(key, "an array of strings", v)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// The architecture families kn reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Llama,
    Qwen2,
    Gpt2,
}

/// The hyperparameters, from `{arch}.*` metadata.
struct Hparams {
    hidden: usize,
    ffn: usize,
    n_layer: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    eps: f64,
    rope_theta: f64,
    /// config.json's `rope_scaling` object, from `{arch}.rope.scaling.*`.
    rope_scaling: Option<serde_json::Value>,
    context: usize,
}

impl Hparams {
    fn read(meta: &Meta<'_>, arch: Arch, name: &str) -> Result<Self> {
        let key = |k: &str| format!("{name}.{k}");
        let hidden = meta.usize_req(&key("embedding_length"))?;
        let ffn = meta.usize_req(&key("feed_forward_length"))?;
        let n_layer = meta.usize_req(&key("block_count"))?;
        let n_head = meta.usize_req(&key("attention.head_count"))?;
        let context = meta.usize_req(&key("context_length"))?;
        let positive = |v: usize, k: &str| {
            if v == 0 {
                Err(meta.err(format!("GGUF metadata {} is 0", key(k))))
            } else {
                Ok(v)
            }
        };
        positive(hidden, "embedding_length")?;
        positive(ffn, "feed_forward_length")?;
        positive(n_layer, "block_count")?;
        positive(n_head, "attention.head_count")?;
        if arch == Arch::Gpt2 {
            let eps = meta.eps_req(&key("attention.layer_norm_epsilon"))?;
            if hidden % n_head != 0 {
                return Err(meta.err(format!(
                    "{} {hidden} is not a multiple of {} {n_head}",
                    key("embedding_length"),
                    key("attention.head_count")
                )));
            }
            return Ok(Self {
                hidden,
                ffn,
                n_layer,
                n_head,
                n_kv_head: n_head,
                head_dim: hidden / n_head,
                eps,
                rope_theta: 0.0,
                rope_scaling: None,
                context,
            });
        }
        let n_kv_head = meta
            .usize_opt(&key("attention.head_count_kv"))?
            .unwrap_or(n_head);
        positive(n_kv_head, "attention.head_count_kv")?;
        if n_head % n_kv_head != 0 {
            return Err(meta.err(format!(
                "{} {n_head} is not a multiple of {} {n_kv_head}",
                key("attention.head_count"),
                key("attention.head_count_kv")
            )));
        }
        let head_dim = match meta.usize_opt(&key("attention.key_length"))? {
            Some(d) => d,
            None if hidden % n_head == 0 => hidden / n_head,
            None => {
                return Err(meta.err(format!(
                    "{} {hidden} is not a multiple of {} {n_head} and {} is missing",
                    key("embedding_length"),
                    key("attention.head_count"),
                    key("attention.key_length")
                )))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(meta.err(format!(
                "head dimension {head_dim} is not even, as rotary embeddings need"
            )));
        }
        if let Some(v) = meta.usize_opt(&key("attention.value_length"))? {
            if v != head_dim {
                return Err(meta.err(format!(
                    "{} {v} differs from the key length {head_dim}, which kn does not support",
                    key("attention.value_length")
                )));
            }
        }
        if let Some(d) = meta.usize_opt(&key("rope.dimension_count"))? {
            if d != head_dim {
                return Err(meta.err(format!(
                    "{} is {d}, not the head dimension {head_dim}: partial rotary embeddings \
                     are not supported",
                    key("rope.dimension_count")
                )));
            }
        }
        let rope_scaling = Self::rope_scaling(meta, name)?;
        let eps = meta.eps_req(&key("attention.layer_norm_rms_epsilon"))?;
        let rope_theta = meta.f64_opt(&key("rope.freq_base"))?.unwrap_or(10000.0);
        Ok(Self {
            hidden,
            ffn,
            n_layer,
            n_head,
            n_kv_head,
            head_dim,
            eps,
            rope_theta,
            rope_scaling,
            context,
        })
    }

    /// config.json's `rope_scaling` from llama.cpp's `{arch}.rope.scaling.type`,
    /// `.factor` and `.original_context_length` (what convert_hf_to_gguf.py writes):
    /// `linear` (factor), `yarn` (factor, original context; transformers' default
    /// betas), `none` or no type with a factor of 0 or 1 (none). Any other type, or
    /// llama.cpp's YaRN tuning keys, are refused.
    fn rope_scaling(meta: &Meta<'_>, name: &str) -> Result<Option<serde_json::Value>> {
        let key = |k: &str| format!("{name}.rope.scaling.{k}");
        let factor = meta.f64_opt(&key("factor"))?;
        let kind = meta.string_opt(&key("type"))?.unwrap_or("none");
        let positive_factor = || -> Result<f64> {
            match factor {
                Some(f) if f.is_finite() && f > 0.0 => Ok(f),
                Some(f) => Err(meta.err(format!("GGUF metadata {} is {f}", key("factor")))),
                None => Err(meta.err(format!("GGUF metadata {} is missing", key("factor")))),
            }
        };
        match kind {
            "none" => match factor {
                Some(f) if f != 0.0 && f != 1.0 => Err(meta.err(format!(
                    "{} is {f} with no {}: rope scaling of unknown type",
                    key("factor"),
                    key("type")
                ))),
                _ => Ok(None),
            },
            "linear" => Ok(Some(
                json!({"rope_type": "linear", "factor": positive_factor()?}),
            )),
            "yarn" => {
                for tuning in ["attn_factor", "yarn_log_multiplier", "yarn_ext_factor"] {
                    if meta.f64_opt(&key(tuning))?.is_some() {
                        return Err(meta.err(format!(
                            "{} is set: llama.cpp's YaRN tuning is not supported (kn reads \
                             GGUF yarn as transformers' yarn with its default parameters)",
                            key(tuning)
                        )));
                    }
                }
                let mut scaling = json!({"rope_type": "yarn", "factor": positive_factor()?});
                if let Some(n) = meta.usize_opt(&key("original_context_length"))? {
                    scaling["original_max_position_embeddings"] = json!(n);
                }
                Ok(Some(scaling))
            }
            other => Err(meta.err(format!(
                "{} is {other:?}: rope scaling of this type is not supported (kn reads linear \
                 and yarn from GGUF metadata)",
                key("type")
            ))),
        }
    }

    /// The Hugging Face config.json.
    fn config(
        &self,
        arch: Arch,
        vocab_size: usize,
        tied: bool,
        vocab: &TokenizerMeta,
        loaded: &[Loaded],
    ) -> serde_json::Value {
        match arch {
            Arch::Gpt2 => json!({
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "vocab_size": vocab_size,
                "n_embd": self.hidden,
                "n_layer": self.n_layer,
                "n_head": self.n_head,
                "n_inner": self.ffn,
                "n_positions": self.context,
                "layer_norm_epsilon": self.eps,
                "activation_function": "gelu_new",
                "tie_word_embeddings": tied,
                "bos_token_id": vocab.bos,
                "eos_token_id": vocab.eos,
                "torch_dtype": "float32",
            }),
            Arch::Llama | Arch::Qwen2 => {
                let (model_type, class) = if arch == Arch::Llama {
                    ("llama", "LlamaForCausalLM")
                } else {
                    ("qwen2", "Qwen2ForCausalLM")
                };
                let attention_bias =
                    arch == Arch::Qwen2 || loaded.iter().any(|t| t.gguf.ends_with(".attn_q.bias"));
                json!({
                    "model_type": model_type,
                    "architectures": [class],
                    "vocab_size": vocab_size,
                    "hidden_size": self.hidden,
                    "intermediate_size": self.ffn,
                    "num_hidden_layers": self.n_layer,
                    "num_attention_heads": self.n_head,
                    "num_key_value_heads": self.n_kv_head,
                    "head_dim": self.head_dim,
                    "rms_norm_eps": self.eps,
                    "rope_theta": self.rope_theta,
                    "rope_scaling": self.rope_scaling,
                    "max_position_embeddings": self.context,
                    "tie_word_embeddings": tied,
                    "bos_token_id": vocab.bos,
                    "eos_token_id": vocab.eos,
                    "hidden_act": "silu",
                    "attention_bias": attention_bias,
                    "torch_dtype": "float32",
                })
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tensor names and shapes.

/// What a tensor needs after dequantization to be in the Hugging Face layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fix {
    None,
    /// llama q rows, permuted by llama.cpp with `n_head`.
    UnpermuteQ,
    /// llama k rows, permuted by llama.cpp with `n_kv_head`.
    UnpermuteK,
    /// A GPT-2 Conv1D weight, stored as `[out, in]`.
    Transpose,
}

/// A dequantized tensor under both names.
struct Loaded {
    gguf: String,
    hf: String,
    fix: Fix,
    tensor: Tensor,
}

/// The Hugging Face name of GGUF tensor `name` and its fix: `None` for a tensor kn does
/// not know, `Some(None)` for one it ignores.
#[allow(clippy::option_option)]
fn hf_name(arch: Arch, name: &str, n_layer: usize) -> Option<Option<(String, Fix)>> {
    let top = |hf: &str| Some(Some((hf.to_string(), Fix::None)));
    if let Some(rest) = name.strip_prefix("blk.") {
        let (layer, tail) = rest.split_once('.')?;
        let n: usize = layer.parse().ok().filter(|n| *n < n_layer)?;
        if layer != n.to_string() {
            return None;
        }
        let (part, kind) = tail.rsplit_once('.')?;
        if kind != "weight" && kind != "bias" {
            return None;
        }
        let (hf, fix) = match arch {
            Arch::Llama | Arch::Qwen2 => {
                let unpermute = |fix| if arch == Arch::Llama { fix } else { Fix::None };
                match part {
                    "attn_norm" => ("input_layernorm", Fix::None),
                    "attn_q" => ("self_attn.q_proj", unpermute(Fix::UnpermuteQ)),
                    "attn_k" => ("self_attn.k_proj", unpermute(Fix::UnpermuteK)),
                    "attn_v" => ("self_attn.v_proj", Fix::None),
                    "attn_output" => ("self_attn.o_proj", Fix::None),
                    "ffn_norm" => ("post_attention_layernorm", Fix::None),
                    "ffn_gate" => ("mlp.gate_proj", Fix::None),
                    "ffn_up" => ("mlp.up_proj", Fix::None),
                    "ffn_down" => ("mlp.down_proj", Fix::None),
                    // The rotary inverse frequencies of old conversions: recomputed.
                    "attn_rot_embd" => return Some(None),
                    _ => return None,
                }
            }
            Arch::Gpt2 => {
                let conv = if kind == "weight" {
                    Fix::Transpose
                } else {
                    Fix::None
                };
                match part {
                    "attn_norm" => ("ln_1", Fix::None),
                    "attn_qkv" => ("attn.c_attn", conv),
                    "attn_output" => ("attn.c_proj", conv),
                    "ffn_norm" => ("ln_2", Fix::None),
                    "ffn_up" => ("mlp.c_fc", conv),
                    "ffn_down" => ("mlp.c_proj", conv),
                    _ => return None,
                }
            }
        };
        let prefix = if arch == Arch::Gpt2 {
            "transformer.h"
        } else {
            "model.layers"
        };
        return Some(Some((format!("{prefix}.{n}.{hf}.{kind}"), fix)));
    }
    match (arch, name) {
        (Arch::Llama | Arch::Qwen2, "token_embd.weight") => top("model.embed_tokens.weight"),
        (Arch::Llama | Arch::Qwen2, "output_norm.weight") => top("model.norm.weight"),
        (Arch::Gpt2, "token_embd.weight") => top("transformer.wte.weight"),
        (Arch::Gpt2, "position_embd.weight") => top("transformer.wpe.weight"),
        (Arch::Gpt2, "output_norm.weight") => top("transformer.ln_f.weight"),
        (Arch::Gpt2, "output_norm.bias") => top("transformer.ln_f.bias"),
        (_, "output.weight") => top("lm_head.weight"),
        _ => None,
    }
}

/// Checks that every tensor the architecture needs is there, with the shape the config
/// gives it (Hugging Face layout), and that nothing is left over.
fn check_shapes(
    path: &Path,
    arch: Arch,
    hp: &Hparams,
    vocab: usize,
    tied: bool,
    loaded: &[Loaded],
) -> Result<()> {
    let (h, f) = (hp.hidden, hp.ffn);
    let mul = |a: usize, b: usize| {
        a.checked_mul(b)
            .ok_or_else(|| Error::model(path, format!("{a} × {b} overflows")))
    };
    let q = mul(hp.n_head, hp.head_dim)?;
    let kv = mul(hp.n_kv_head, hp.head_dim)?;
    // Each tensor the configuration needs, checked as soon as named, so that a huge
    // block_count fails at the first missing layer.
    let by_name: HashMap<&str, &Loaded> = loaded.iter().map(|t| (t.gguf.as_str(), t)).collect();
    let mut seen: HashSet<String> = HashSet::new();
    let mut add = |name: String, shape: Vec<usize>| -> Result<()> {
        let t = by_name
            .get(name.as_str())
            .ok_or_else(|| Error::model(path, format!("tensor {name} is missing")))?;
        if t.tensor.dims() != shape.as_slice() {
            return Err(Error::model(
                path,
                format!(
                    "tensor {name} ({}) has shape {:?}, expected {shape:?} from the metadata",
                    t.hf,
                    t.tensor.dims()
                ),
            ));
        }
        seen.insert(name);
        Ok(())
    };
    let has = |name: &str| loaded.iter().any(|t| t.gguf == name);
    match arch {
        Arch::Llama | Arch::Qwen2 => {
            add("token_embd.weight".into(), vec![vocab, h])?;
            add("output_norm.weight".into(), vec![h])?;
            if !tied {
                add("output.weight".into(), vec![vocab, h])?;
            }
            // Llama with attention_bias has all four biases; Qwen2 has q/k/v ones.
            let llama_bias = arch == Arch::Llama && has("blk.0.attn_q.bias");
            let qkv_bias = arch == Arch::Qwen2 || llama_bias;
            for n in 0..hp.n_layer {
                let b = |p: &str| format!("blk.{n}.{p}");
                add(b("attn_norm.weight"), vec![h])?;
                add(b("ffn_norm.weight"), vec![h])?;
                add(b("attn_q.weight"), vec![q, h])?;
                add(b("attn_k.weight"), vec![kv, h])?;
                add(b("attn_v.weight"), vec![kv, h])?;
                add(b("attn_output.weight"), vec![h, q])?;
                add(b("ffn_gate.weight"), vec![f, h])?;
                add(b("ffn_up.weight"), vec![f, h])?;
                add(b("ffn_down.weight"), vec![h, f])?;
                if qkv_bias {
                    add(b("attn_q.bias"), vec![q])?;
                    add(b("attn_k.bias"), vec![kv])?;
                    add(b("attn_v.bias"), vec![kv])?;
                }
                if llama_bias {
                    add(b("attn_output.bias"), vec![h])?;
                }
            }
        }
        Arch::Gpt2 => {
            add("token_embd.weight".into(), vec![vocab, h])?;
            add("position_embd.weight".into(), vec![hp.context, h])?;
            add("output_norm.weight".into(), vec![h])?;
            add("output_norm.bias".into(), vec![h])?;
            if !tied {
                add("output.weight".into(), vec![vocab, h])?;
            }
            let h3 = mul(3, h)?;
            for n in 0..hp.n_layer {
                let b = |p: &str| format!("blk.{n}.{p}");
                for norm in ["attn_norm", "ffn_norm"] {
                    add(b(&format!("{norm}.weight")), vec![h])?;
                    add(b(&format!("{norm}.bias")), vec![h])?;
                }
                add(b("attn_qkv.weight"), vec![h, h3])?;
                add(b("attn_qkv.bias"), vec![h3])?;
                add(b("attn_output.weight"), vec![h, h])?;
                add(b("attn_output.bias"), vec![h])?;
                add(b("ffn_up.weight"), vec![h, f])?;
                add(b("ffn_up.bias"), vec![f])?;
                add(b("ffn_down.weight"), vec![f, h])?;
                add(b("ffn_down.bias"), vec![h])?;
            }
        }
    }
    if let Some(extra) = loaded.iter().find(|t| !seen.contains(t.gguf.as_str())) {
        return Err(Error::model(
            path,
            format!(
                "tensor {} ({}) is not expected with this configuration",
                extra.gguf, extra.hf
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The tokenizer.

/// The `tokenizer.ggml.*` metadata.
struct TokenizerMeta {
    model: String,
    tokens: Vec<String>,
    token_types: Option<Vec<i64>>,
    merges: Option<Vec<String>>,
    scores: Option<Vec<f32>>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_space_prefix: Option<bool>,
}

/// `tokenizer.ggml.token_type` of a control token.
const TOKEN_CONTROL: i64 = 3;
/// `tokenizer.ggml.token_type` of a user-defined token.
const TOKEN_USER_DEFINED: i64 = 4;

impl TokenizerMeta {
    fn read(meta: &Meta<'_>) -> Result<Self> {
        let model = meta.string_req("tokenizer.ggml.model")?.to_string();
        let tokens = meta
            .strings_opt("tokenizer.ggml.tokens")?
            .ok_or_else(|| meta.missing("tokenizer.ggml.tokens"))?;
        let n = tokens.len();
        let check_len = |key: &str, len: usize| {
            if len == n {
                Ok(())
            } else {
                Err(meta.err(format!(
                    "GGUF metadata {key} has {len} entries, tokenizer.ggml.tokens {n}"
                )))
            }
        };
        let token_types = match meta.array_opt("tokenizer.ggml.token_type")? {
            None => None,
            Some(a) => {
                check_len("tokenizer.ggml.token_type", a.len())?;
                Some(
                    a.iter()
                        .map(|v| match *v {
                            Value::I32(x) => Ok(i64::from(x)),
                            Value::U32(x) => Ok(i64::from(x)),
                            Value::I8(x) => Ok(i64::from(x)),
                            Value::U8(x) => Ok(i64::from(x)),
                            ref v => Err(meta.wrong(
                                "tokenizer.ggml.token_type",
                                "an array of integers",
                                v,
                            )),
                        })
                        .collect::<Result<Vec<_>>>()?,
                )
            }
        };
        let scores = match meta.array_opt("tokenizer.ggml.scores")? {
            None => None,
            Some(a) => {
                check_len("tokenizer.ggml.scores", a.len())?;
                Some(
                    a.iter()
                        .map(|v| match *v {
                            Value::F32(x) => Ok(x),
                            ref v => Err(meta.wrong("tokenizer.ggml.scores", "an array of f32", v)),
                        })
                        .collect::<Result<Vec<_>>>()?,
                )
            }
        };
        let merges = meta.strings_opt("tokenizer.ggml.merges")?;
        let id = |key: &str| -> Result<Option<u32>> {
            match meta.u64_opt(key)? {
                None => Ok(None),
                Some(id) if (id as usize) < n && id < u64::from(u32::MAX) => Ok(Some(id as u32)),
                Some(id) => Err(meta.err(format!(
                    "GGUF metadata {key} is {id}, beyond the {n} tokens"
                ))),
            }
        };
        Ok(Self {
            model,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            add_space_prefix: meta.bool_opt("tokenizer.ggml.add_space_prefix")?,
            tokens,
            token_types,
            merges,
            scores,
        })
    }

    fn token(&self, id: Option<u32>) -> Option<&str> {
        id.and_then(|i| self.tokens.get(i as usize))
            .map(String::as_str)
    }
}

/// Qwen2's pre-tokenizer regex (transformers' `Qwen2Converter`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Builds the tokenizer as transformers 4.47.1 does from a GGUF file: the converter is
/// chosen by the architecture (`GGUFLlamaConverter` for llama, `GGUFQwen2Converter`,
/// `GGUFGPTConverter`), `tokenizer.ggml.pre` is not used.
fn build_tokenizer(v: &TokenizerMeta, arch: Arch) -> std::result::Result<Tokenizer, String> {
    let fail = |e: String| format!("cannot build the tokenizer: {e}");
    let byte_level = || json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let add_prefix_space = v.add_space_prefix.unwrap_or(true);
    let (mut tokenizer, normalizer, pre_tokenizer, decoder, add_bos) = match (
        arch,
        v.model.as_str(),
    ) {
        (_, "gpt2") => {
            let merges = v
                .merges
                .as_deref()
                .ok_or("GGUF metadata key tokenizer.ggml.merges is missing")?;
            let merges = parse_merges(merges)?;
            let llama = arch == Arch::Llama;
            let mut bpe = BPE::builder()
                .vocab_and_merges(vocab(&v.tokens), merges)
                .fuse_unk(llama)
                .byte_fallback(llama);
            if llama {
                if let Some(unk) = v.token(v.unk) {
                    bpe = bpe.unk_token(unk.to_string());
                }
            }
            let bpe = bpe.build().map_err(|e| fail(e.to_string()))?;
            match arch {
                // transformers' "llama 3" path of GGUFLlamaConverter.
                Arch::Llama => {
                    let mut decoders = vec![
                        json!({"type": "ByteFallback"}),
                        json!({"type": "Fuse"}),
                        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                    ];
                    if add_prefix_space {
                        decoders
                            .push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                    }
                    (
                        Tokenizer::new(bpe),
                        None,
                        Some(byte_level()),
                        json!({"type": "Sequence", "decoders": decoders}),
                        true,
                    )
                }
                Arch::Qwen2 => (
                    Tokenizer::new(bpe),
                    Some(json!({"type": "NFC"})),
                    Some(json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
                    ]})),
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                    false,
                ),
                Arch::Gpt2 => (
                    Tokenizer::new(bpe),
                    None,
                    Some(byte_level()),
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                    false,
                ),
            }
        }
        // SentencePiece vocabularies (Llama 2): GGUFLlamaConverter's BPE with byte
        // fallback, merges derived from the scores when the file has none.
        (Arch::Llama, "llama") => {
            let merges = match &v.merges {
                Some(m) => parse_merges(m)?,
                None => {
                    let scores = v.scores.as_ref().ok_or(
                        "GGUF metadata key tokenizer.ggml.scores is missing (needed without \
                             tokenizer.ggml.merges)",
                    )?;
                    merges_from_scores(&v.tokens, scores)?
                }
            };
            let mut bpe = BPE::builder()
                .vocab_and_merges(vocab(&v.tokens), merges)
                .fuse_unk(true)
                .byte_fallback(true);
            if let Some(unk) = v.token(v.unk) {
                bpe = bpe.unk_token(unk.to_string());
            }
            let bpe = bpe.build().map_err(|e| fail(e.to_string()))?;
            let mut normalizers = Vec::new();
            if add_prefix_space {
                normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            normalizers.push(
                json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
            );
            let mut decoders = vec![
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            ];
            if add_prefix_space {
                decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            (
                Tokenizer::new(bpe),
                Some(json!({"type": "Sequence", "normalizers": normalizers})),
                None,
                json!({"type": "Sequence", "decoders": decoders}),
                true,
            )
        }
        (_, "llama") => {
            return Err(format!(
                "GGUF tokenizer model \"llama\" (tokenizer.ggml.model) is not supported for \
                     architecture {arch:?}"
            ))
        }
        (_, other) => {
            return Err(format!(
                "GGUF tokenizer model {other:?} (tokenizer.ggml.model) is not supported \
                     (gpt2, llama)"
            ))
        }
    };
    if let Some(n) = normalizer {
        let n: NormalizerWrapper = serde_json::from_value(n).map_err(|e| fail(e.to_string()))?;
        tokenizer.with_normalizer(Some(n));
    }
    if let Some(p) = pre_tokenizer {
        let p: PreTokenizerWrapper = serde_json::from_value(p).map_err(|e| fail(e.to_string()))?;
        tokenizer.with_pre_tokenizer(Some(p));
    }
    let d: DecoderWrapper = serde_json::from_value(decoder).map_err(|e| fail(e.to_string()))?;
    tokenizer.with_decoder(Some(d));

    // Special added tokens: the control tokens (token_type 3), and the unknown, BOS and
    // EOS tokens (which transformers' tokenizer classes register as special tokens).
    // User-defined tokens (4) are plain added tokens, as in a Hugging Face tokenizer.json
    // (transformers' GGUF loader ignores them).
    let mut special = Vec::new();
    let mut added = Vec::new();
    if let Some(types) = &v.token_types {
        for (tok, ty) in v.tokens.iter().zip(types) {
            match *ty {
                TOKEN_CONTROL => special.push(tok.as_str()),
                TOKEN_USER_DEFINED if !tok.is_empty() => {
                    added.push(AddedToken::from(tok.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
    }
    special.extend(
        [v.token(v.unk), v.token(v.bos), v.token(v.eos)]
            .into_iter()
            .flatten(),
    );
    let mut unique = HashSet::new();
    let special: Vec<AddedToken> = special
        .into_iter()
        .filter(|t| !t.is_empty() && unique.insert(*t))
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&added);

    // transformers' LlamaTokenizerFast always prepends BOS (add_bos_token=True, whatever
    // tokenizer.ggml.add_bos_token says) and never appends EOS; its GPT-2 and Qwen2
    // tokenizers add neither.
    let post = match v.bos.zip(v.token(v.bos)) {
        Some(bos) if add_bos => template(bos),
        _ => {
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
        }
    };
    let post: PostProcessorWrapper =
        serde_json::from_value(post).map_err(|e| fail(e.to_string()))?;
    tokenizer.with_post_processor(Some(post));
    Ok(tokenizer)
}

/// The TemplateProcessing of transformers' `LlamaTokenizerFast.update_post_processor`
/// with add_bos_token and without add_eos_token: `bos $A`, and `bos $A bos $B` for pairs.
fn template((id, bos): (u32, &str)) -> serde_json::Value {
    let special = |type_id: u32| json!({"SpecialToken": {"id": bos, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    json!({
        "type": "TemplateProcessing",
        "single": [special(0), seq("A", 0)],
        "pair": [special(0), seq("A", 0), special(1), seq("B", 1)],
        "special_tokens": {bos: {"id": bos, "ids": [id], "tokens": [bos]}},
    })
}

/// `tokenizer.ggml.merges` ("a b" strings) as pairs.
fn parse_merges(merges: &[String]) -> std::result::Result<Vec<(String, String)>, String> {
    merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("tokenizer.ggml.merges[{i}] {m:?} is not \"a b\""))
        })
        .collect()
}

/// A score that `total_cmp` orders as Python compares floats: -0 and 0 equal, NaN (which
/// Python cannot order) lowest.
fn sortable(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == 0.0 {
        0.0
    } else {
        x
    }
}

/// Token → id, a later duplicate winning (as a Python dict comprehension).
fn vocab(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

/// The merges transformers' `GGUFTokenizerSkeleton` derives from a SentencePiece vocabulary:
/// every split of every token into two tokens, ordered by the merged token's score
/// (highest first), ties by the pieces' scores.
fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
) -> std::result::Result<Vec<(String, String)>, String> {
    let mut score: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (t, s) in tokens.iter().zip(scores) {
        score.insert(t.as_str(), *s);
    }
    // Each token costs its length squared (the substrings hashed): bounded, so that a
    // crafted vocabulary of huge tokens cannot stall the reader.
    let mut budget: u64 = 1 << 32;
    let mut seen = HashSet::with_capacity(tokens.len());
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for t in tokens {
        if !seen.insert(t.as_str()) {
            continue;
        }
        let len = t.len() as u64;
        budget = budget.checked_sub(len * len).ok_or(
            "tokenizer.ggml.tokens holds tokens too long to derive merges from the scores",
        )?;
        let piece_score = score.get(t.as_str()).copied().unwrap_or(0.0);
        let mut local: Vec<(&str, &str, f32)> = t
            .char_indices()
            .skip(1)
            .map(|(i, _)| t.split_at(i))
            .filter(|(l, r)| score.contains_key(l) && score.contains_key(r))
            .map(|(l, r)| (l, r, piece_score))
            .collect();
        // Python's sorted(..., reverse=True) is stable, as sort_by is.
        local.sort_by(|a, b| {
            let key = |x: &(&str, &str, f32)| {
                (
                    sortable(score.get(x.0).copied().unwrap_or(0.0)),
                    sortable(score.get(x.1).copied().unwrap_or(0.0)),
                )
            };
            let (ka, kb) = (key(a), key(b));
            kb.0.total_cmp(&ka.0).then(kb.1.total_cmp(&ka.1))
        });
        merges.extend(local);
    }
    merges.sort_by(|a, b| sortable(b.2).total_cmp(&sortable(a.2)));
    Ok(merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use candle_core::quantized::{gguf_file, QTensor};
    use std::path::PathBuf;

    /// A tiny byte-level BPE vocabulary: "hello world" is two tokens.
    const TOKENS: [&str; 24] = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "h",
        "e",
        "l",
        "o",
        "\u{120}",
        "w",
        "r",
        "d",
        "he",
        "ll",
        "hell",
        "hello",
        "\u{120}w",
        "or",
        "\u{120}wor",
        "ld",
        "\u{120}world",
        "<user>",
        "1",
        "2",
        "12",
    ];
    const MERGES: [&str; 10] = [
        "h e",
        "l l",
        "he ll",
        "hell o",
        "\u{120} w",
        "o r",
        "\u{120}w or",
        "l d",
        "\u{120}wor ld",
        "1 2",
    ];
    /// Control tokens 0-2, user-defined token 20.
    fn token_types() -> Vec<i32> {
        (0..TOKENS.len())
            .map(|i| match i {
                0..=2 => 3,
                20 => 4,
                _ => 1,
            })
            .collect()
    }

    fn s(x: &str) -> Value {
        Value::String(x.to_string())
    }

    fn strings(xs: &[&str]) -> Value {
        Value::Array(xs.iter().map(|x| s(x)).collect())
    }

    /// A GGUF file to be: metadata and tensors, in order.
    struct Spec {
        meta: Vec<(String, Value)>,
        tensors: Vec<(String, QTensor)>,
    }

    impl Spec {
        fn set(&mut self, key: &str, value: Value) {
            self.meta.retain(|(k, _)| k != key);
            self.meta.push((key.to_string(), value));
        }

        fn remove(&mut self, key: &str) {
            self.meta.retain(|(k, _)| k != key);
        }

        fn tensor(&mut self, name: &str, t: &Tensor, dtype: GgmlDType) {
            self.tensors.retain(|(n, _)| n != name);
            let q = QTensor::quantize(t, dtype).expect("quantize");
            self.tensors.push((name.to_string(), q));
        }

        fn bytes(&self) -> Vec<u8> {
            let meta: Vec<(&str, &Value)> =
                self.meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let tensors: Vec<(&str, &QTensor)> =
                self.tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let mut out = std::io::Cursor::new(Vec::new());
            gguf_file::write(&mut out, &meta, &tensors).expect("write gguf");
            out.into_inner()
        }

        fn write(&self, dir: &Path, name: &str) -> PathBuf {
            let path = dir.join(name);
            std::fs::write(&path, self.bytes()).expect("write file");
            path
        }
    }

    fn randn(rng: &mut SplitMix64, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
    }

    /// convert_hf_to_gguf.py's `LlamaModel.permute`:
    /// `w.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)`.
    fn llama_cpp_permute(w: &Tensor, n_head: usize) -> Tensor {
        let dims = w.dims().to_vec();
        let rest: usize = dims[1..].iter().product();
        w.reshape((n_head, 2, dims[0] / n_head / 2, rest))
            .and_then(|t| t.transpose(1, 2))
            .and_then(|t| t.contiguous())
            .and_then(|t| t.reshape(dims))
            .expect("permute")
    }

    fn tokenizer_meta(spec: &mut Spec) {
        spec.set("tokenizer.ggml.model", s("gpt2"));
        spec.set("tokenizer.ggml.pre", s("smollm"));
        spec.set("tokenizer.ggml.tokens", strings(&TOKENS));
        spec.set(
            "tokenizer.ggml.token_type",
            Value::Array(token_types().into_iter().map(Value::I32).collect()),
        );
        spec.set("tokenizer.ggml.merges", strings(&MERGES));
        spec.set("tokenizer.ggml.bos_token_id", Value::U32(1));
        spec.set("tokenizer.ggml.eos_token_id", Value::U32(2));
        spec.set("tokenizer.ggml.add_bos_token", Value::Bool(false));
    }

    /// The expected Hugging Face tensors, with the tolerance of their GGUF type.
    type Expected = Vec<(String, Tensor, f32)>;

    fn tol(dtype: GgmlDType) -> f32 {
        match dtype {
            GgmlDType::F32 => 0.0,
            GgmlDType::Q8_0 => 0.03,
            GgmlDType::Q4_1 => 0.3,
            _ => 1.0,
        }
    }

    /// A tiny llama (hidden 64, 4 heads of 16, 2 kv heads, ffn 96, 2 layers, vocab 24),
    /// written as llama.cpp writes it: q/k permuted, dims innermost first.
    fn llama_spec(hidden: usize, ffn: usize, layers: usize, tied: bool) -> (Spec, Expected) {
        let (n_head, n_kv, head_dim) = (hidden / 16, hidden / 32, 16);
        let mut rng = SplitMix64::new(7);
        let mut spec = Spec {
            meta: Vec::new(),
            tensors: Vec::new(),
        };
        spec.set("general.architecture", s("llama"));
        spec.set("general.name", s("tiny"));
        spec.set("llama.block_count", Value::U32(layers as u32));
        spec.set("llama.context_length", Value::U32(128));
        spec.set("llama.embedding_length", Value::U32(hidden as u32));
        spec.set("llama.feed_forward_length", Value::U32(ffn as u32));
        spec.set("llama.attention.head_count", Value::U32(n_head as u32));
        spec.set("llama.attention.head_count_kv", Value::U32(n_kv as u32));
        spec.set("llama.rope.freq_base", Value::F32(100000.0));
        spec.set("llama.rope.dimension_count", Value::U32(head_dim as u32));
        spec.set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
        tokenizer_meta(&mut spec);
        let mut expected = Vec::new();
        let v = TOKENS.len();
        let mut add = |spec: &mut Spec, gguf: &str, hf: &str, t: Tensor, stored: Tensor, dt| {
            spec.tensor(gguf, &stored, dt);
            expected.push((hf.to_string(), t, tol(dt)));
        };
        let t = randn(&mut rng, &[v, hidden]);
        add(
            &mut spec,
            "token_embd.weight",
            "model.embed_tokens.weight",
            t.clone(),
            t,
            GgmlDType::Q8_0,
        );
        for n in 0..layers {
            let hf = |p: &str| format!("model.layers.{n}.{p}");
            let g = |p: &str| format!("blk.{n}.{p}");
            let norm = randn(&mut rng, &[hidden]);
            add(
                &mut spec,
                &g("attn_norm.weight"),
                &hf("input_layernorm.weight"),
                norm.clone(),
                norm,
                GgmlDType::F32,
            );
            let q = randn(&mut rng, &[n_head * head_dim, hidden]);
            let stored = llama_cpp_permute(&q, n_head);
            // Layer 0 exact (f32), layer 1 through a quantized type.
            let qt = if n == 0 {
                GgmlDType::F32
            } else {
                GgmlDType::Q8_0
            };
            add(
                &mut spec,
                &g("attn_q.weight"),
                &hf("self_attn.q_proj.weight"),
                q,
                stored,
                qt,
            );
            let k = randn(&mut rng, &[n_kv * head_dim, hidden]);
            let stored = llama_cpp_permute(&k, n_kv);
            add(
                &mut spec,
                &g("attn_k.weight"),
                &hf("self_attn.k_proj.weight"),
                k,
                stored,
                qt,
            );
            let w = randn(&mut rng, &[n_kv * head_dim, hidden]);
            add(
                &mut spec,
                &g("attn_v.weight"),
                &hf("self_attn.v_proj.weight"),
                w.clone(),
                w,
                GgmlDType::Q4_1,
            );
            let w = randn(&mut rng, &[hidden, n_head * head_dim]);
            add(
                &mut spec,
                &g("attn_output.weight"),
                &hf("self_attn.o_proj.weight"),
                w.clone(),
                w,
                GgmlDType::Q8_0,
            );
            let w = randn(&mut rng, &[hidden]);
            add(
                &mut spec,
                &g("ffn_norm.weight"),
                &hf("post_attention_layernorm.weight"),
                w.clone(),
                w,
                GgmlDType::F32,
            );
            let w = randn(&mut rng, &[ffn, hidden]);
            add(
                &mut spec,
                &g("ffn_gate.weight"),
                &hf("mlp.gate_proj.weight"),
                w.clone(),
                w,
                GgmlDType::Q4_1,
            );
            let w = randn(&mut rng, &[ffn, hidden]);
            add(
                &mut spec,
                &g("ffn_up.weight"),
                &hf("mlp.up_proj.weight"),
                w.clone(),
                w,
                GgmlDType::Q8_0,
            );
            let w = randn(&mut rng, &[hidden, ffn]);
            add(
                &mut spec,
                &g("ffn_down.weight"),
                &hf("mlp.down_proj.weight"),
                w.clone(),
                w,
                GgmlDType::F32,
            );
        }
        let w = randn(&mut rng, &[hidden]);
        add(
            &mut spec,
            "output_norm.weight",
            "model.norm.weight",
            w.clone(),
            w,
            GgmlDType::F32,
        );
        if !tied {
            let w = randn(&mut rng, &[v, hidden]);
            add(
                &mut spec,
                "output.weight",
                "lm_head.weight",
                w.clone(),
                w,
                GgmlDType::Q4_1,
            );
        }
        (spec, expected)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all());
        d.and_then(|d| d.max(0))
            .and_then(|m| m.to_scalar::<f32>())
            .expect("diff")
    }

    fn check_tensors(ck: &GgufCheckpoint, expected: &Expected) {
        let names: Vec<&str> = ck.tensors.iter().map(|(n, _)| n.as_str()).collect();
        let want: Vec<&str> = expected.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, want);
        for ((name, got), (_, want, tol)) in ck.tensors.iter().zip(expected) {
            assert_eq!(got.dims(), want.dims(), "{name}");
            assert_eq!(got.dtype(), DType::F32, "{name}");
            let diff = max_abs_diff(got, want);
            assert!(diff <= *tol, "{name}: max |diff| {diff} > {tol}");
        }
    }

    fn encode(ck: &GgufCheckpoint, text: &str) -> Vec<u32> {
        ck.tokenizer
            .encode(text, true)
            .expect("encode")
            .get_ids()
            .to_vec()
    }

    fn err_of(path: &Path) -> String {
        match read(path) {
            Ok(_) => panic!("{} read without error", path.display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn gguf_llama_names_layout_config_tokenizer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spec, expected) = llama_spec(64, 96, 2, false);
        let path = spec.write(dir.path(), "tiny.gguf");
        let ck = read(&path).expect("read");
        assert_eq!(ck.architecture, "llama");
        check_tensors(&ck, &expected);
        // Un-permuted exactly (f32) and within Q8_0 error for layer 1; a permuted matrix
        // would differ by O(1).
        let q0 = &ck.tensors[2].1;
        assert_eq!(max_abs_diff(q0, &expected[2].1), 0.0);

        let c = &ck.config;
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(c["vocab_size"], 24);
        assert_eq!(c["hidden_size"], 64);
        assert_eq!(c["intermediate_size"], 96);
        assert_eq!(c["num_hidden_layers"], 2);
        assert_eq!(c["num_attention_heads"], 4);
        assert_eq!(c["num_key_value_heads"], 2);
        assert_eq!(c["head_dim"], 16);
        assert_eq!(c["rms_norm_eps"], 1e-5);
        assert_eq!(c["rope_theta"], 100000.0);
        assert_eq!(c["max_position_embeddings"], 128);
        assert_eq!(c["tie_word_embeddings"], false);
        assert_eq!(c["bos_token_id"], 1);
        assert_eq!(c["eos_token_id"], 2);
        assert_eq!(c["hidden_act"], "silu");
        assert_eq!(c["attention_bias"], false);
        assert_eq!(
            ck.tensor_types,
            vec![
                ("f32".to_string(), 9),
                ("q8_0".to_string(), 7),
                ("q4_1".to_string(), 5)
            ]
        );

        // The ids transformers 4.47.1 gives for this file (AutoTokenizer with gguf_file):
        // BOS prepended although tokenizer.ggml.add_bos_token is false, digits not split.
        assert_eq!(encode(&ck, "hello world"), [1, 14, 19]);
        assert_eq!(encode(&ck, "12"), [1, 23]);
        assert_eq!(encode(&ck, "1212 hello"), [1, 23, 23, 7, 14]);
        assert_eq!(encode(&ck, "<|im_start|>hello<|im_end|>"), [1, 1, 14, 2]);
        assert_eq!(encode(&ck, " hello world"), [1, 7, 14, 19]);
        assert_eq!(encode(&ck, "hello  world"), [1, 14, 7, 19]);
        // The user-defined token is an added token (transformers: [1, 4, 9, 14]).
        assert_eq!(encode(&ck, "<user>hello"), [1, 20, 14]);
        let decoded = ck.tokenizer.decode(&[1, 14, 19], true).expect("decode");
        assert_eq!(decoded, "hello world");
        assert_eq!(ck.tokenizer.get_vocab_size(true), 24);
    }

    #[test]
    fn gguf_llama_tied_without_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spec, expected) = llama_spec(32, 32, 1, true);
        let ck = read(&spec.write(dir.path(), "tied.gguf")).expect("read");
        check_tensors(&ck, &expected);
        assert_eq!(ck.config["tie_word_embeddings"], true);
        assert!(ck.tensors.iter().all(|(n, _)| n != "lm_head.weight"));
    }

    #[test]
    fn gguf_qwen2_biases_not_permuted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (hidden, ffn, n_head, n_kv, hd) = (32, 64, 2, 1, 16);
        let mut rng = SplitMix64::new(3);
        let mut spec = Spec {
            meta: Vec::new(),
            tensors: Vec::new(),
        };
        spec.set("general.architecture", s("qwen2"));
        spec.set("qwen2.block_count", Value::U32(1));
        spec.set("qwen2.context_length", Value::U32(64));
        spec.set("qwen2.embedding_length", Value::U32(hidden as u32));
        spec.set("qwen2.feed_forward_length", Value::U32(ffn as u32));
        spec.set("qwen2.attention.head_count", Value::U32(n_head));
        spec.set("qwen2.attention.head_count_kv", Value::U32(n_kv));
        spec.set("qwen2.attention.layer_norm_rms_epsilon", Value::F32(1e-6));
        tokenizer_meta(&mut spec);
        let shapes: Vec<(&str, &str, Vec<usize>)> = vec![
            (
                "token_embd.weight",
                "model.embed_tokens.weight",
                vec![24, hidden],
            ),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
                vec![hidden],
            ),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
                vec![n_head as usize * hd, hidden],
            ),
            (
                "blk.0.attn_q.bias",
                "model.layers.0.self_attn.q_proj.bias",
                vec![n_head as usize * hd],
            ),
            (
                "blk.0.attn_k.weight",
                "model.layers.0.self_attn.k_proj.weight",
                vec![n_kv as usize * hd, hidden],
            ),
            (
                "blk.0.attn_k.bias",
                "model.layers.0.self_attn.k_proj.bias",
                vec![n_kv as usize * hd],
            ),
            (
                "blk.0.attn_v.weight",
                "model.layers.0.self_attn.v_proj.weight",
                vec![n_kv as usize * hd, hidden],
            ),
            (
                "blk.0.attn_v.bias",
                "model.layers.0.self_attn.v_proj.bias",
                vec![n_kv as usize * hd],
            ),
            (
                "blk.0.attn_output.weight",
                "model.layers.0.self_attn.o_proj.weight",
                vec![hidden, n_head as usize * hd],
            ),
            (
                "blk.0.ffn_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
                vec![hidden],
            ),
            (
                "blk.0.ffn_gate.weight",
                "model.layers.0.mlp.gate_proj.weight",
                vec![ffn, hidden],
            ),
            (
                "blk.0.ffn_up.weight",
                "model.layers.0.mlp.up_proj.weight",
                vec![ffn, hidden],
            ),
            (
                "blk.0.ffn_down.weight",
                "model.layers.0.mlp.down_proj.weight",
                vec![hidden, ffn],
            ),
            ("output_norm.weight", "model.norm.weight", vec![hidden]),
        ];
        let mut expected = Vec::new();
        for (g, hf, shape) in shapes {
            let t = randn(&mut rng, &shape);
            spec.tensor(g, &t, GgmlDType::F32);
            expected.push((hf.to_string(), t, 0.0));
        }
        let ck = read(&spec.write(dir.path(), "qwen.gguf")).expect("read");
        check_tensors(&ck, &expected);
        assert_eq!(ck.config["model_type"], "qwen2");
        assert_eq!(ck.config["architectures"], json!(["Qwen2ForCausalLM"]));
        assert_eq!(ck.config["attention_bias"], true);
        assert_eq!(ck.config["rope_theta"], 10000.0);
        assert_eq!(ck.config["rms_norm_eps"], 1e-6);
        assert_eq!(ck.config["tie_word_embeddings"], true);
        // transformers' Qwen2 tokenizer: digits split, no BOS.
        assert_eq!(encode(&ck, "hello world"), [14, 19]);
        assert_eq!(encode(&ck, "12"), [21, 22]);
        assert_eq!(encode(&ck, "1212 hello"), [21, 22, 21, 22, 7, 14]);
        assert_eq!(encode(&ck, "<|im_start|>hello<|im_end|>"), [1, 14, 2]);
    }

    /// A tiny GPT-2 written as llama.cpp's converter writes it: Conv1D weights transposed,
    /// the tied embedding repeated as output.weight.
    fn gpt2_spec() -> (Spec, Expected) {
        let (n, inner, pos, v) = (64, 128, 16, TOKENS.len());
        let mut rng = SplitMix64::new(11);
        let mut spec = Spec {
            meta: Vec::new(),
            tensors: Vec::new(),
        };
        spec.set("general.architecture", s("gpt2"));
        spec.set("gpt2.block_count", Value::U32(1));
        spec.set("gpt2.context_length", Value::U32(pos as u32));
        spec.set("gpt2.embedding_length", Value::U32(n as u32));
        spec.set("gpt2.feed_forward_length", Value::U32(inner as u32));
        spec.set("gpt2.attention.head_count", Value::U32(4));
        spec.set("gpt2.attention.layer_norm_epsilon", Value::F32(1e-5));
        tokenizer_meta(&mut spec);
        spec.remove("tokenizer.ggml.add_bos_token");
        let mut expected = Vec::new();
        let wte = randn(&mut rng, &[v, n]);
        spec.tensor("token_embd.weight", &wte, GgmlDType::F32);
        expected.push(("transformer.wte.weight".to_string(), wte.clone(), 0.0));
        let wpe = randn(&mut rng, &[pos, n]);
        spec.tensor("position_embd.weight", &wpe, GgmlDType::F32);
        expected.push(("transformer.wpe.weight".to_string(), wpe, 0.0));
        // (GGUF part, HF part, HF shape; Conv1D weights are [in, out])
        let parts: Vec<(&str, &str, Vec<usize>, bool)> = vec![
            ("attn_norm.weight", "ln_1.weight", vec![n], false),
            ("attn_norm.bias", "ln_1.bias", vec![n], false),
            (
                "attn_qkv.weight",
                "attn.c_attn.weight",
                vec![n, 3 * n],
                true,
            ),
            ("attn_qkv.bias", "attn.c_attn.bias", vec![3 * n], false),
            ("attn_output.weight", "attn.c_proj.weight", vec![n, n], true),
            ("attn_output.bias", "attn.c_proj.bias", vec![n], false),
            ("ffn_norm.weight", "ln_2.weight", vec![n], false),
            ("ffn_norm.bias", "ln_2.bias", vec![n], false),
            ("ffn_up.weight", "mlp.c_fc.weight", vec![n, inner], true),
            ("ffn_up.bias", "mlp.c_fc.bias", vec![inner], false),
            ("ffn_down.weight", "mlp.c_proj.weight", vec![inner, n], true),
            ("ffn_down.bias", "mlp.c_proj.bias", vec![n], false),
        ];
        for (g, hf, shape, conv) in parts {
            let t = randn(&mut rng, &shape);
            let (stored, dt) = if conv {
                (
                    t.t().and_then(|x| x.contiguous()).expect("t"),
                    GgmlDType::Q8_0,
                )
            } else {
                (t.clone(), GgmlDType::F32)
            };
            spec.tensor(&format!("blk.0.{g}"), &stored, dt);
            expected.push((format!("transformer.h.0.{hf}"), t, tol(dt)));
        }
        for (g, hf) in [("weight", "weight"), ("bias", "bias")] {
            let t = randn(&mut rng, &[n]);
            spec.tensor(&format!("output_norm.{g}"), &t, GgmlDType::F32);
            expected.push((format!("transformer.ln_f.{hf}"), t, 0.0));
        }
        spec.tensor("output.weight", &wte, GgmlDType::F32);
        (spec, expected)
    }

    #[test]
    fn gguf_gpt2_conv1d_layout_and_tied_output() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut spec, expected) = gpt2_spec();
        let ck = read(&spec.write(dir.path(), "gpt2.gguf")).expect("read");
        check_tensors(&ck, &expected);
        let c = &ck.config;
        assert_eq!(c["model_type"], "gpt2");
        assert_eq!(c["architectures"], json!(["GPT2LMHeadModel"]));
        assert_eq!(c["vocab_size"], 24);
        assert_eq!(c["n_embd"], 64);
        assert_eq!(c["n_layer"], 1);
        assert_eq!(c["n_head"], 4);
        assert_eq!(c["n_inner"], 128);
        assert_eq!(c["n_positions"], 16);
        assert_eq!(c["layer_norm_epsilon"], 1e-5);
        assert_eq!(c["activation_function"], "gelu_new");
        assert_eq!(c["tie_word_embeddings"], true);
        // transformers' GPT-2 tokenizer: no BOS.
        assert_eq!(encode(&ck, "hello world"), [14, 19]);
        assert_eq!(encode(&ck, "<|endoftext|>hello"), [0, 14]);

        // A real lm_head (not the embedding) stays, untied.
        let mut rng = SplitMix64::new(5);
        spec.tensor("output.weight", &randn(&mut rng, &[24, 64]), GgmlDType::F32);
        let ck = read(&spec.write(dir.path(), "gpt2-untied.gguf")).expect("read");
        assert_eq!(ck.config["tie_word_embeddings"], false);
        assert_eq!(
            ck.tensors.last().map(|(n, _)| n.as_str()),
            Some("lm_head.weight")
        );
    }

    #[test]
    fn gguf_sentencepiece_tokenizer_matches_transformers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut spec, _) = llama_spec(32, 32, 1, true);
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        tokens.extend((0..256).map(|b| format!("<0x{b:02X}>")));
        let mut types: Vec<i32> = vec![2, 3, 3];
        types.extend([6; 256]);
        let pieces: [(&str, f32); 22] = [
            ("\u{2581}", -1.0),
            ("h", -2.0),
            ("e", -3.0),
            ("l", -4.0),
            ("o", -5.0),
            ("w", -6.0),
            ("r", -7.0),
            ("d", -8.0),
            ("he", -20.0),
            ("ll", -21.0),
            ("\u{2581}h", -22.0),
            ("\u{2581}he", -23.0),
            ("hell", -24.0),
            ("\u{2581}hell", -25.0),
            ("\u{2581}hello", -26.0),
            ("\u{2581}w", -27.0),
            ("or", -28.0),
            ("\u{2581}wor", -29.0),
            ("ld", -30.0),
            ("\u{2581}world", -31.0),
            ("lo", -19.0),
            ("llo", -32.0),
        ];
        let mut scores = vec![0.0f32; tokens.len()];
        for (p, sc) in pieces {
            tokens.push(p.to_string());
            types.push(1);
            scores.push(sc);
        }
        let toks: Vec<&str> = tokens.iter().map(String::as_str).collect();
        spec.set("tokenizer.ggml.model", s("llama"));
        spec.remove("tokenizer.ggml.pre");
        spec.remove("tokenizer.ggml.merges");
        spec.remove("tokenizer.ggml.add_bos_token");
        spec.set("tokenizer.ggml.tokens", strings(&toks));
        spec.set(
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        );
        spec.set(
            "tokenizer.ggml.scores",
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        );
        spec.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
        let mut rng = SplitMix64::new(1);
        spec.tensor(
            "token_embd.weight",
            &randn(&mut rng, &[tokens.len(), 32]),
            GgmlDType::F32,
        );
        let ck = read(&spec.write(dir.path(), "spm.gguf")).expect("read");
        // The ids transformers 4.47.1 gives (merges built from the scores, byte fallback).
        assert_eq!(encode(&ck, "hello world"), [1, 273, 278]);
        assert_eq!(encode(&ck, "Hello world"), [1, 259, 75, 261, 280, 278]);
        assert_eq!(encode(&ck, "h\u{e9}llo"), [1, 269, 198, 172, 280]);
        assert_eq!(encode(&ck, "<s>hello"), [1, 1, 273]);
        assert_eq!(encode(&ck, "hello  world"), [1, 273, 259, 278]);
        assert_eq!(encode(&ck, " hello"), [1, 259, 273]);
        assert_eq!(encode(&ck, "hellollo"), [1, 273, 280]);
        let decoded = ck
            .tokenizer
            .decode(&[1, 259, 75, 261, 280, 278], true)
            .expect("decode");
        assert_eq!(decoded, "Hello world");
    }

    /// A change to a valid file's spec.
    type Edit = Box<dyn Fn(&mut Spec)>;

    #[test]
    fn gguf_errors_name_the_key_architecture_model_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (base, _) = llama_spec(32, 32, 1, true);
        let fresh = || Spec {
            meta: base.meta.clone(),
            tensors: base
                .tensors
                .iter()
                .map(|(n, t)| {
                    let data = t.dequantize(&Device::Cpu).expect("dequantize");
                    (
                        n.clone(),
                        QTensor::quantize(&data, t.dtype()).expect("quantize"),
                    )
                })
                .collect(),
        };
        let cases: Vec<(&str, Edit, &str)> = vec![
            ("no-layers", Box::new(|s| s.remove("llama.block_count")), "llama.block_count is missing"),
            ("no-eps", Box::new(|s| s.remove("llama.attention.layer_norm_rms_epsilon")), "llama.attention.layer_norm_rms_epsilon is missing"),
            ("nan-eps", Box::new(|s| s.set("llama.attention.layer_norm_rms_epsilon", Value::F32(f32::NAN))), "llama.attention.layer_norm_rms_epsilon is NaN"),
            ("inf-eps", Box::new(|s| s.set("llama.attention.layer_norm_rms_epsilon", Value::F32(f32::INFINITY))), "llama.attention.layer_norm_rms_epsilon is inf"),
            ("no-tokens", Box::new(|s| s.remove("tokenizer.ggml.tokens")), "tokenizer.ggml.tokens is missing"),
            ("no-arch", Box::new(|s| s.remove("general.architecture")), "general.architecture is missing"),
            ("falcon", Box::new(|s| s.set("general.architecture", Value::String("falcon".into()))), "GGUF architecture \"falcon\" is not supported (llama, qwen2, gpt2)"),
            ("bert-vocab", Box::new(|s| s.set("tokenizer.ggml.model", Value::String("bert".into()))), "GGUF tokenizer model \"bert\""),
            ("longrope", Box::new(|s| s.set("llama.rope.scaling.type", Value::String("longrope".into()))), "llama.rope.scaling.type is \"longrope\""),
            ("yarn-no-factor", Box::new(|s| s.set("llama.rope.scaling.type", Value::String("yarn".into()))), "llama.rope.scaling.factor is missing"),
            ("yarn-tuned", Box::new(|s| {
                s.set("llama.rope.scaling.type", Value::String("yarn".into()));
                s.set("llama.rope.scaling.factor", Value::F32(4.0));
                s.set("llama.rope.scaling.attn_factor", Value::F32(1.1));
            }), "llama.rope.scaling.attn_factor is set"),
            ("factor-no-type", Box::new(|s| s.set("llama.rope.scaling.factor", Value::F32(4.0))), "rope scaling of unknown type"),
            ("heads-type", Box::new(|s| s.set("llama.attention.head_count", Value::String("2".into()))), "llama.attention.head_count"),
            ("rope-freqs", Box::new(|s| {
                let t = Tensor::ones(8, DType::F32, &Device::Cpu).expect("ones");
                s.tensor("rope_freqs.weight", &t, GgmlDType::F32)
            }), "tensor rope_freqs.weight holds per-frequency rotary factors"),
            ("bad-shape", Box::new(|s| {
                let t = Tensor::ones((32, 64), DType::F32, &Device::Cpu).expect("ones");
                s.tensor("blk.0.ffn_up.weight", &t, GgmlDType::F32)
            }), "tensor blk.0.ffn_up.weight (model.layers.0.mlp.up_proj.weight) has shape [32, 64], expected [32, 32]"),
            ("missing-tensor", Box::new(|s| s.tensors.retain(|(n, _)| n != "blk.0.ffn_gate.weight")), "tensor blk.0.ffn_gate.weight is missing"),
            ("extra-layer", Box::new(|s| {
                let t = Tensor::ones(32, DType::F32, &Device::Cpu).expect("ones");
                s.tensor("blk.1.attn_norm.weight", &t, GgmlDType::F32)
            }), "tensor blk.1.attn_norm.weight is not one kn knows"),
            ("vocab", Box::new(|s| {
                s.set("tokenizer.ggml.tokens", strings(&TOKENS[..20]));
                s.set("tokenizer.ggml.merges", strings(&MERGES[..9]));
                s.set("tokenizer.ggml.token_type", Value::Array(vec![Value::I32(1); 20]));
            }), "token_embd.weight has 24 rows but tokenizer.ggml.tokens has 20 tokens"),
        ];
        for (name, edit, want) in cases {
            let mut spec = fresh();
            edit(&mut spec);
            let path = spec.write(dir.path(), &format!("{name}.gguf"));
            let err = err_of(&path);
            assert!(err.contains(want), "{name}: {err:?} lacks {want:?}");
            assert!(err.contains(&path.display().to_string()), "{name}: {err:?}");
        }
    }

    /// llama.cpp's rope scaling metadata becomes config.json's rope_scaling: linear with
    /// its factor, yarn with its factor and original context; a model loads with it.
    #[test]
    fn gguf_rope_scaling_metadata_becomes_rope_scaling() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut spec, _) = llama_spec(64, 96, 2, false);
        spec.set("llama.rope.scaling.type", Value::String("linear".into()));
        spec.set("llama.rope.scaling.factor", Value::F32(4.0));
        let ck = read(&spec.write(dir.path(), "linear.gguf")).expect("read");
        assert_eq!(
            ck.config["rope_scaling"],
            json!({"rope_type": "linear", "factor": 4.0})
        );
        let config = crate::model::Config::from_json(&ck.config).expect("config");
        assert_eq!(
            config.rope_scaling,
            Some(crate::model::rope::RopeScaling::Linear { factor: 4.0 })
        );
        let (mut spec, _) = llama_spec(64, 96, 2, false);
        spec.set("llama.rope.scaling.type", Value::String("yarn".into()));
        spec.set("llama.rope.scaling.factor", Value::F32(8.0));
        spec.set("llama.rope.scaling.original_context_length", Value::U32(16));
        let ck = read(&spec.write(dir.path(), "yarn.gguf")).expect("read");
        assert_eq!(
            ck.config["rope_scaling"],
            json!({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16})
        );
        let config = crate::model::Config::from_json(&ck.config).expect("config");
        assert_eq!(config.rope_scaling.as_ref().map(|s| s.name()), Some("yarn"));
        let (mut spec, _) = llama_spec(64, 96, 2, false);
        spec.set("llama.rope.scaling.type", Value::String("none".into()));
        let ck = read(&spec.write(dir.path(), "none.gguf")).expect("read");
        assert!(ck.config["rope_scaling"].is_null());
    }

    /// The byte offset of tensor `name`'s type field in a GGUF file's bytes.
    fn tensor_type_offset(bytes: &[u8], name: &str) -> usize {
        let mut pat = (name.len() as u64).to_le_bytes().to_vec();
        pat.extend(name.as_bytes());
        let at = bytes
            .windows(pat.len())
            .position(|w| w == pat.as_slice())
            .expect("tensor info");
        let p = at + pat.len();
        let n_dims = u32::from_le_bytes(bytes[p..p + 4].try_into().expect("u32")) as usize;
        p + 4 + 8 * n_dims
    }

    #[test]
    fn gguf_unsupported_tensor_type_names_type_and_tensor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spec, _) = llama_spec(32, 32, 1, true);
        let mut bytes = spec.bytes();
        let at = tensor_type_offset(&bytes, "blk.0.ffn_up.weight");
        for (ty, want) in [
            (16u32, "GGUF type iq2_xxs"),
            (15, "GGUF type q8_k"),
            (77, "unknown GGUF tensor type 77"),
        ] {
            bytes[at..at + 4].copy_from_slice(&ty.to_le_bytes());
            let path = dir.path().join(format!("type{ty}.gguf"));
            std::fs::write(&path, &bytes).expect("write");
            let err = err_of(&path);
            assert!(
                err.contains(want) && err.contains("blk.0.ffn_up.weight"),
                "{err}"
            );
        }
    }

    #[test]
    fn gguf_corrupt_files_are_errors_never_panics() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (spec, _) = llama_spec(32, 32, 1, true);
        let good = spec.bytes();
        let path = dir.path().join("fuzz.gguf");
        std::fs::write(&path, &good).expect("write");
        read(&path).expect("the unmutated file reads");
        let data_start = Content::read(&mut std::io::Cursor::new(&good))
            .expect("content")
            .tensor_data_offset as usize;
        let check = |bytes: &[u8], what: &str| {
            std::fs::write(&path, bytes).expect("write");
            if let Err(e) = read(&path) {
                let e = e.to_string();
                assert!(!e.contains("panicked"), "{what}: {e}");
            }
        };
        // Every truncation of the header, and a sample of the data, is an error: a cut
        // file that read would be a model with missing weights. Only the padding after
        // the last tensor's data may go.
        let data_end = {
            let content = Content::read(&mut std::io::Cursor::new(&good)).expect("content");
            let end = content
                .tensor_infos
                .values()
                .map(|t| {
                    let elems = t.shape.elem_count();
                    t.offset as usize + elems / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()
                })
                .max()
                .expect("tensors");
            data_start + end
        };
        assert!(good[data_end..].iter().all(|&b| b == 0), "padding only");
        let mut cuts = 0;
        for len in (0..data_start + 8)
            .chain((data_start + 8..data_end).step_by(61))
            .chain([data_end - 1])
        {
            std::fs::write(&path, &good[..len]).expect("write");
            let e = read(&path)
                .err()
                .unwrap_or_else(|| panic!("truncated to {len} of {} bytes: read", good.len()))
                .to_string();
            assert!(!e.contains("panicked"), "truncated to {len}: {e}");
            cuts += 1;
        }
        assert!(cuts > data_start, "{cuts} cuts");
        let mut rng = SplitMix64::new(2024);
        for i in 0..400 {
            let mut bytes = good.clone();
            let region = if i % 4 == 3 { good.len() } else { data_start };
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(region);
                match rng.below(4) {
                    0 => bytes[at] = rng.next_u64() as u8,
                    1 => bytes[at] ^= 1 << rng.below(8),
                    2 => bytes[at] = 0xff,
                    _ => {
                        // A random count, length, dim or offset.
                        let v = match rng.below(3) {
                            0 => rng.next_u64(),
                            1 => rng.next_u64() >> 40,
                            _ => rng.below(64) as u64,
                        };
                        let end = (at + 8).min(bytes.len());
                        bytes[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
                    }
                }
            }
            check(&bytes, &format!("mutation {i}"));
        }
    }

    #[test]
    fn gguf_smollm2_real_file() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = root.join("models/smollm2");
        // Missing is a failure, as in tests/common: a skipped test proves nothing.
        assert!(
            dir.join(".complete").is_file(),
            "{} is missing: run `bash scripts/fetch-test-models` (the test command \
             `bash scripts/test` does)",
            dir.display()
        );
        let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
        let ck = read(&path).expect("read SmolLM2");
        let c = &ck.config;
        assert_eq!(ck.architecture, "llama");
        assert_eq!(c["num_hidden_layers"], 30);
        assert_eq!(c["hidden_size"], 576);
        assert_eq!(c["intermediate_size"], 1536);
        assert_eq!(c["num_attention_heads"], 9);
        assert_eq!(c["num_key_value_heads"], 3);
        assert_eq!(c["head_dim"], 64);
        assert_eq!(c["vocab_size"], 49152);
        assert_eq!(c["tie_word_embeddings"], true);
        assert_eq!(c["rope_theta"], 100000.0);
        assert_eq!(c["rms_norm_eps"], 1e-5);
        assert_eq!(c["max_position_embeddings"], 8192);
        assert_eq!(c["bos_token_id"], 1);
        assert_eq!(c["eos_token_id"], 2);
        assert_eq!(ck.tensors.len(), 272);
        assert_eq!(
            ck.tensor_types,
            vec![
                ("q4_1".to_string(), 210),
                ("f32".to_string(), 61),
                ("q8_0".to_string(), 1)
            ]
        );
        let shape = |name: &str| {
            ck.tensors
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.dims().to_vec())
        };
        assert_eq!(shape("model.embed_tokens.weight"), Some(vec![49152, 576]));
        assert_eq!(
            shape("model.layers.29.self_attn.q_proj.weight"),
            Some(vec![576, 576])
        );
        assert_eq!(
            shape("model.layers.0.self_attn.k_proj.weight"),
            Some(vec![192, 576])
        );
        assert_eq!(
            shape("model.layers.0.mlp.down_proj.weight"),
            Some(vec![576, 1536])
        );
        assert_eq!(shape("lm_head.weight"), None);
        // Values transformers 4.47.1's load_gguf_checkpoint gives (rows 1 and 33: the
        // un-permutation moves them).
        let values = |name: &str, row: usize, n: usize| -> Vec<f32> {
            let (_, t) = ck.tensors.iter().find(|(t, _)| t == name).expect(name);
            let row = t.get(row).and_then(|r| r.to_vec1::<f32>()).expect("row");
            row[..n].to_vec()
        };
        let close = |got: Vec<f32>, want: &[f64]| {
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(g, w)| (f64::from(*g) - w).abs() < 1e-6),
                "{got:?} vs {want:?}"
            );
        };
        let k0 = "model.layers.0.self_attn.k_proj.weight";
        close(
            values(k0, 1, 3),
            &[0.203369140625, 0.09136962890625, 0.203369140625],
        );
        close(values(k0, 33, 2), &[-0.09912109375, 0.22955322265625]);
        let q5 = "model.layers.5.self_attn.q_proj.weight";
        close(
            values(q5, 1, 3),
            &[0.0746612548828125, 0.1134490966796875, -0.0029144287109375],
        );
        close(values(q5, 33, 2), &[0.0168609619140625, -0.0047607421875]);
        close(
            values("model.embed_tokens.weight", 33, 2),
            &[-0.0373992919921875, 0.0157470703125],
        );

        // The ids transformers 4.47.1 gives (scripts/golden/smollm2_predict.py): BOS first.
        assert_eq!(
            encode(&ck, "The capital of France is"),
            [1, 504, 3575, 282, 4649, 314]
        );
        let golden = root.join("tests/golden/smollm2_predict.json");
        if let Ok(text) = std::fs::read_to_string(&golden) {
            let g: serde_json::Value = serde_json::from_str(&text).expect("golden json");
            let prompts = g["prompts"].as_array().expect("prompts");
            assert!(!prompts.is_empty());
            for p in prompts {
                let text = p["input_text"].as_str().expect("input_text");
                let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).expect("ids");
                assert_eq!(encode(&ck, text), ids, "{text:?}");
            }
        }
    }
}
