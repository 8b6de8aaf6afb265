//! Writing an edited model as a Hugging Face directory, atomically, and restoring the
//! original from it (`kn edit --revert`).
//!
//! The edited `model.safetensors` is the source file with only the bytes of the edited
//! value-slot columns rewritten in place (a `pytorch_model.bin` source is first
//! converted, every tensor under its own name and dtype), so everything else stays
//! byte-identical and reverting restores the exact file. A GGUF source becomes a Hugging
//! Face directory: `config.json` and `tokenizer.json` from its metadata and a
//! `model.safetensors` of its dequantized (f32) tensors under Hugging Face names, then
//! edited the same way. The directory is built under a hidden staging name beside
//! `--out` and swapped in whole when complete ([`StagedDir`]): a kill at any point
//! leaves the old or the new directory at `--out`, and at most a staging directory that
//! the next `kn edit` on that `--out` removes.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Deserialize;

use super::record::{EditsFile, SlotRecord};
use super::SlotEdit;
use crate::data::output::StagedDir;
use crate::error::{Error, Result};
use crate::model::files::sha256_file;
use crate::model::language_model::{normalize_name, value_slot_tensor};
use crate::model::load::{read_tensors, write_tensors};
use crate::model::{Architecture, LoadedModel, ModelFiles, Neuron, WeightsFile};

/// The name of the edit record in an edited model directory.
pub const EDITS_FILE: &str = "edits.json";
/// The weights file of an edited model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";

#[derive(Debug, Clone, Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Where each tensor of a safetensors file lies.
#[derive(Debug, Clone)]
pub struct SafetensorsLayout {
    path: PathBuf,
    architecture: Architecture,
    data_start: u64,
    tensors: BTreeMap<String, TensorEntry>,
}

impl SafetensorsLayout {
    /// Reads the header of a safetensors file of an `architecture` model.
    pub fn read(path: &Path, architecture: Architecture) -> Result<Self> {
        let bad = |reason: String| Error::model(path, reason);
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| bad("too short to be a safetensors file".into()))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > size.saturating_sub(8) || header_len > 100_000_000 {
            return Err(bad(format!(
                "safetensors header length {header_len} does not fit the file (truncated?)"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(path, e))?;
        let mut entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("safetensors header is not valid JSON: {e}")))?;
        entries.remove("__metadata__");
        let data_start = 8 + header_len;
        let mut tensors = BTreeMap::new();
        for (name, value) in entries {
            let entry: TensorEntry = serde_json::from_value(value)
                .map_err(|e| bad(format!("safetensors entry {name}: {e}")))?;
            if data_start + entry.data_offsets[1] > size {
                return Err(bad(format!(
                    "tensor {name} lies past the end of the file (truncated?)"
                )));
            }
            tensors.insert(name, entry);
        }
        Ok(Self {
            path: path.to_path_buf(),
            architecture,
            data_start,
            tensors,
        })
    }

    /// The tensor holding layer `layer`'s value slots, under its name in the file, and
    /// whether it stores a slot as a row (GPT-2's Conv1D) rather than a column.
    fn slot_tensor(&self, layer: usize) -> Result<(&str, &TensorEntry, bool)> {
        let (wanted, as_rows) = value_slot_tensor(self.architecture, layer);
        self.tensors
            .iter()
            .find(|(name, _)| normalize_name(self.architecture, name).as_ref() == Some(&wanted))
            .map(|(name, entry)| (name.as_str(), entry, as_rows))
            .ok_or_else(|| Error::model(&self.path, format!("has no tensor {wanted}")))
    }

    /// The dtype the value slots are stored in (that of layer 0's FFN output projection).
    pub fn slot_dtype(&self) -> Result<DType> {
        let (name, entry, _) = self.slot_tensor(0)?;
        dtype_of(&entry.dtype)
            .map(|(dtype, _)| dtype)
            .ok_or_else(|| {
                Error::model(
                    &self.path,
                    format!("{name} is stored as {}, which kn cannot edit", entry.dtype),
                )
            })
    }

    /// Byte offset of each element of a neuron's column, its element size and dtype,
    /// and the tensor's name.
    fn column(&self, neuron: Neuron) -> Result<(Vec<u64>, DType, String)> {
        let (name, entry, as_rows) = self.slot_tensor(neuron.layer)?;
        let (dtype, size) = dtype_of(&entry.dtype).ok_or_else(|| {
            Error::model(
                &self.path,
                format!("{name} is stored as {}, which kn cannot edit", entry.dtype),
            )
        })?;
        let [rows, cols] = entry.shape[..] else {
            return Err(Error::model(&self.path, format!("{name} is not a matrix")));
        };
        let (hidden, width) = if as_rows { (cols, rows) } else { (rows, cols) };
        if neuron.index >= width {
            return Err(Error::Neuron(format!(
                "neuron {}:{} is outside {name} [{rows}, {cols}]",
                neuron.layer, neuron.index
            )));
        }
        let base = self.data_start + entry.data_offsets[0];
        let element = |row: usize, col: usize| base + ((row * cols + col) * size) as u64;
        let offsets = (0..hidden)
            .map(|h| {
                if as_rows {
                    element(neuron.index, h)
                } else {
                    element(h, neuron.index)
                }
            })
            .collect();
        Ok((offsets, dtype, name.to_string()))
    }

    /// Reads a neuron's value slot from the file.
    pub fn read_column(&self, neuron: Neuron) -> Result<Vec<f32>> {
        let (offsets, dtype, _) = self.column(neuron)?;
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let size = dtype.size_in_bytes();
        let mut buf = [0u8; 8];
        offsets
            .into_iter()
            .map(|at| {
                file.read_exact_at(&mut buf[..size], at)
                    .map_err(|e| Error::io(&self.path, e))?;
                Ok(decode(&buf[..size], dtype))
            })
            .collect()
    }

    /// Overwrites neurons' value slots in the file, in place; returns each slot's
    /// tensor name.
    pub fn write_columns(&self, columns: &[(Neuron, &[f32])]) -> Result<Vec<String>> {
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        let mut names = Vec::with_capacity(columns.len());
        for &(neuron, values) in columns {
            let (offsets, dtype, name) = self.column(neuron)?;
            if offsets.len() != values.len() {
                return Err(Error::Neuron(format!(
                    "value slot {}:{} has {} values; {name} has {} rows",
                    neuron.layer,
                    neuron.index,
                    values.len(),
                    offsets.len()
                )));
            }
            for (at, &v) in offsets.into_iter().zip(values) {
                file.write_all_at(&encode(v, dtype), at)
                    .map_err(|e| Error::io(&self.path, e))?;
            }
            names.push(name);
        }
        file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(names)
    }
}

fn dtype_of(name: &str) -> Option<(DType, usize)> {
    match name {
        "F32" => Some((DType::F32, 4)),
        "F64" => Some((DType::F64, 8)),
        "F16" => Some((DType::F16, 2)),
        "BF16" => Some((DType::BF16, 2)),
        _ => None,
    }
}

fn encode(v: f32, dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F64 => f64::from(v).to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
        DType::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
        _ => v.to_le_bytes().to_vec(),
    }
}

fn decode(bytes: &[u8], dtype: DType) -> f32 {
    match dtype {
        DType::F64 => f64::from_le_bytes(bytes.try_into().unwrap_or_default()) as f32,
        DType::F16 => half::f16::from_le_bytes(bytes.try_into().unwrap_or_default()).to_f32(),
        DType::BF16 => half::bf16::from_le_bytes(bytes.try_into().unwrap_or_default()).to_f32(),
        _ => f32::from_le_bytes(bytes.try_into().unwrap_or_default()),
    }
}

/// The dtype a source model's value slots are stored in, and so will be in the edited
/// model (safetensors header, the tensor read from a PyTorch file, f32 for a GGUF file,
/// whose edited copy holds its dequantized weights).
pub fn storage_dtype(files: &ModelFiles, architecture: Architecture) -> Result<DType> {
    match &files.weights {
        WeightsFile::Safetensors(path) => SafetensorsLayout::read(path, architecture)?.slot_dtype(),
        WeightsFile::Pytorch(_) => {
            let (wanted, _) = value_slot_tensor(architecture, 0);
            let tensors = read_tensors(&files.weights)?;
            tensors
                .iter()
                .find(|(name, _)| normalize_name(architecture, name).as_ref() == Some(&wanted))
                .map(|(_, t)| t.dtype())
                .ok_or_else(|| Error::model(files.weights.path(), format!("has no {wanted}")))
        }
        WeightsFile::Gguf(_) => Ok(DType::F32),
    }
}

/// Files that hold weights: never copied into an edited directory, where they would be
/// stale, unedited copies.
fn is_weights_file(name: &str) -> bool {
    name.ends_with(".safetensors")
        || name == "model.safetensors.index.json"
        || name.starts_with("pytorch_model")
        || name.ends_with(".h5")
        || name.ends_with(".msgpack")
        || name.ends_with(".ckpt")
        || name.ends_with(".onnx")
        || name.ends_with(".pt")
}

/// Refuses an existing `out` unless `force`, then stages the new directory beside it
/// ([`StagedDir`]: swapped in whole, atomically, on commit).
fn begin(out: &Path, force: bool) -> Result<StagedDir> {
    if out.exists() && !force {
        return Err(Error::model(
            out,
            "already exists; pass --force to replace it",
        ));
    }
    StagedDir::create(out)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(|e| Error::io(path, e))?;
    std::io::Write::write_all(&mut file, bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn copy_synced(from: &Path, to: &Path) -> Result<()> {
    // Named by the destination: a full disk is the copy's, not the source's, problem.
    std::fs::copy(from, to).map_err(|e| Error::io(to, e))?;
    File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(to, e))
}

/// Copies the regular files of `dir` (symlinks followed, as in the hub cache) into
/// `into`, except those `skip` names.
fn copy_files(dir: &Path, into: &Path, skip: impl Fn(&str) -> bool) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !path.is_file() || skip(&name) {
            continue;
        }
        copy_synced(&path, &into.join(&name))?;
    }
    Ok(())
}

/// In debug builds, `KN_TEST_CRASH_WHILE_WRITING` aborts the process half-way through
/// writing, so tests can check that a crash leaves no partial `--out`.
fn crash_point() {
    #[cfg(debug_assertions)]
    if std::env::var_os("KN_TEST_CRASH_WHILE_WRITING").is_some() {
        std::process::abort();
    }
}

/// Writes the edited model into `out`: every file of the source directory except
/// weights (a GGUF source: `config.json` and `tokenizer.json` made from its metadata),
/// `model.safetensors` with the slots' new values, and `edits.json` (`edits` completed
/// with the slots, hashes and the source's own `edits.json`).
pub fn write_edited_model(
    lm: &LoadedModel,
    out: &Path,
    slots: &[SlotEdit],
    mut edits: EditsFile,
    force: bool,
) -> Result<EditsFile> {
    let source = &lm.files;
    let staging = begin(out, force)?;
    if let Some(source_dir) = source.directory() {
        copy_files(&source_dir, staging.path(), |name| {
            is_weights_file(name) || name == EDITS_FILE
        })?;
    }
    let weights = staging.path().join(WEIGHTS_FILE);
    match &source.weights {
        WeightsFile::Safetensors(path) => copy_synced(path, &weights)?,
        WeightsFile::Gguf(path) => {
            let tensors: std::collections::HashMap<String, candle_core::Tensor> =
                read_tensors(&source.weights)?.into_iter().collect();
            write_tensors(&tensors, &weights)?;
            write_json(&staging.path().join("config.json"), &lm.config.to_json())?;
            let tokenizer = staging.path().join("tokenizer.json");
            lm.tokenizer
                .inner()
                .save(&tokenizer, true)
                .map_err(|e| Error::model(path, format!("cannot write its tokenizer: {e}")))?;
        }
        WeightsFile::Pytorch(_) => {
            let tensors: std::collections::HashMap<String, candle_core::Tensor> =
                read_tensors(&source.weights)?.into_iter().collect();
            write_tensors(&tensors, &weights)?;
            // The same permissions as the source weights (a copy would keep them too).
            let source_weights = source.weights.path();
            let permissions = std::fs::metadata(source_weights)
                .map_err(|e| Error::io(source_weights, e))?
                .permissions();
            std::fs::set_permissions(&weights, permissions).map_err(|e| Error::io(&weights, e))?;
        }
    }
    edits.restored_sha256 = sha256_file(&weights)?;
    let layout = SafetensorsLayout::read(&weights, lm.architecture())?;
    let columns: Vec<(Neuron, &[f32])> =
        slots.iter().map(|s| (s.neuron, s.new.as_slice())).collect();
    let names = layout.write_columns(&columns)?;
    crash_point();
    edits.slots = slots
        .iter()
        .zip(names)
        .map(|(slot, tensor)| SlotRecord {
            layer: slot.neuron.layer,
            index: slot.neuron.index,
            tensor,
            old: slot.old.clone(),
        })
        .collect();
    edits.weights_file = WEIGHTS_FILE.into();
    edits.weights_sha256 = sha256_file(&weights)?;
    let previous = source.directory().map(|dir| dir.join(EDITS_FILE));
    edits.previous_edits = match previous {
        Some(previous) if previous.is_file() => {
            Some(std::fs::read_to_string(&previous).map_err(|e| Error::io(&previous, e))?)
        }
        _ => None,
    };
    write_json(&staging.path().join(EDITS_FILE), &edits)?;
    staging.commit()?;
    Ok(edits)
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        )
    })?;
    text.push('\n');
    write_synced(path, text.as_bytes())
}

/// Reads the `edits.json` of an edited model directory.
pub fn read_edits(dir: &Path) -> Result<EditsFile> {
    let path = dir.join(EDITS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::model(dir, "has no edits.json: not a directory written by kn edit")
        } else {
            Error::io(&path, e)
        }
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::model(&path, format!("not a kn edits record: {e}")))
}

/// Restores the model an edited directory was made from into `out`: the weights get
/// their old value slots back (checked against the recorded hash), the source's own
/// `edits.json` comes back if it had one, every other file is copied.
pub fn revert(dir: &Path, out: &Path, force: bool) -> Result<EditsFile> {
    let edits = read_edits(dir)?;
    let weights_in = dir.join(&edits.weights_file);
    let found = sha256_file(&weights_in)?;
    if found != edits.weights_sha256 {
        return Err(Error::model(
            &weights_in,
            format!(
                "has changed since kn edit wrote it (sha256 {found}, edits.json says {}); \
                 cannot restore it exactly",
                edits.weights_sha256
            ),
        ));
    }
    let staging = begin(out, force)?;
    copy_files(dir, staging.path(), |name| name == EDITS_FILE)?;
    let weights = staging.path().join(&edits.weights_file);
    let columns: Vec<(Neuron, &[f32])> = edits
        .slots
        .iter()
        .map(|s| {
            (
                Neuron {
                    layer: s.layer,
                    index: s.index,
                },
                s.old.as_slice(),
            )
        })
        .collect();
    SafetensorsLayout::read(&weights, edits.source.model.architecture)?.write_columns(&columns)?;
    let restored = sha256_file(&weights)?;
    if restored != edits.restored_sha256 {
        return Err(Error::model(
            &weights,
            format!(
                "restored weights hash to {restored}, not {} as recorded",
                edits.restored_sha256
            ),
        ));
    }
    if let Some(previous) = &edits.previous_edits {
        write_synced(&staging.path().join(EDITS_FILE), previous.as_bytes())?;
    }
    staging.commit()?;
    Ok(edits)
}
