//! The bounded pre-parse: the header (magic, version, counts, lengths, value types,
//! tensor shapes, types and data ranges) checked against what the file can hold before
//! candle's reader, which trusts those numbers, sees it; the tensor types kn dequantizes.

use std::collections::HashSet;
use std::io::Read;

use candle_core::quantized::GgmlDType;

/// What the pre-parse keeps of the header: the tensors, in the file's order.
pub(super) struct Layout {
    pub(super) tensors: Vec<TensorEntry>,
}

/// One tensor info, as checked.
pub(super) struct TensorEntry {
    /// The name as candle reads it (trailing NULs dropped, lossy UTF-8).
    pub(super) name: String,
    /// The GGUF type's name ("q4_1").
    pub(super) type_name: &'static str,
}

/// Nesting depth of metadata arrays the pre-parse accepts (an array of arrays at most).
const MAX_ARRAY_DEPTH: usize = 2;

/// Reads the header from `r` (positioned at the file's start, `len` bytes long) and checks
/// every count, length, type, shape and data range against what the file can hold.
pub(super) fn scan<R: Read>(r: R, len: u64) -> std::result::Result<Layout, String> {
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

#[cfg(test)]
mod tests {
    use super::super::test_files::*;
    use candle_core::quantized::gguf_file::Content;

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
}
