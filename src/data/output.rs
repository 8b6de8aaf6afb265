//! Output safety shared by every writer (see `docs/reliability.md`): an output is never
//! one of the run's inputs, has one writer at a time (an advisory lock beside it), and
//! is replaced whole (a file renamed into place, a directory swapped in by one atomic
//! exchange). Whatever a killed run leaves beside an output (`.NAME.kn-partial-PID`,
//! `.NAME.kn-old-PID`) is recovered or removed by the next run on that output.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Whether `path` means stdout (`-`).
pub fn is_stdout(path: &Path) -> bool {
    path == Path::new("-")
}

fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The place an output will really be written: the file itself with symlinks followed
/// when it exists, else its folder's real path joined with its name.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if let Ok(real) = path.canonicalize() {
        return Ok(real);
    }
    let name = path
        .file_name()
        .ok_or_else(|| Error::output(path, "does not name a file or directory"))?;
    let folder = folder_of(path);
    let folder = folder
        .canonicalize()
        .ok()
        .filter(|f| f.is_dir())
        .ok_or_else(|| {
            Error::output(
                path,
                format!(
                    "cannot write it: the folder {} does not exist (or is not a folder)",
                    folder.display()
                ),
            )
        })?;
    Ok(folder.join(name))
}

/// Refuses `out` when it is one of `inputs` (the same file under any name, symlink or
/// hard link), or, as an output directory that is replaced whole, holds one of them.
/// Inputs that are `-` or do not exist cannot be overwritten and are passed over.
pub fn refuse_inputs(out: &Path, inputs: &[PathBuf]) -> Result<()> {
    if is_stdout(out) {
        return Ok(());
    }
    let target = resolve(out)?;
    let out_meta = std::fs::metadata(&target).ok();
    for input in inputs {
        if is_stdout(input) {
            continue;
        }
        let Ok(real) = input.canonicalize() else {
            continue;
        };
        let same_file = match (&out_meta, std::fs::metadata(&real)) {
            (Some(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if same_file || real.starts_with(&target) {
            return Err(Error::output(
                out,
                format!(
                    "is also an input ({}); kn never writes over its inputs: choose another output",
                    input.display()
                ),
            ));
        }
    }
    Ok(())
}

/// `.NAME.SUFFIX` beside `target` (a resolved output).
fn beside(target: &Path, suffix: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    folder_of(target).join(format!(".{name}.{suffix}"))
}

/// The advisory lock that makes a run the only writer of an output: `flock` on
/// `.NAME.kn-lock` beside it, which holds the process id for the message another run
/// gets. Held until dropped (the kernel drops it when the process dies, so a killed run
/// never leaves a stale lock; the file it leaves is reused).
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    file: File,
}

impl OutputLock {
    /// Takes the lock of `out`, or says which process holds it.
    pub fn acquire(out: &Path) -> Result<Self> {
        let target = resolve(out)?;
        let path = beside(&target, "kn-lock");
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| Error::io(&path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    let pid = match text.trim() {
                        "" => "?".to_string(),
                        pid => pid.to_string(),
                    };
                    return Err(Error::output(
                        out,
                        format!(
                            "another kn run (process {pid}) is writing it (lock {}); wait for \
                             it to end, or choose another output",
                            path.display()
                        ),
                    ));
                }
                // A file system without locks: run unguarded rather than not at all.
                Err(std::fs::TryLockError::Error(e))
                    if e.kind() == std::io::ErrorKind::Unsupported => {}
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
            }
            // The run that held the lock may have removed the file between our open and
            // our lock: ours then guards nothing, so take the file now at the path.
            let current = std::fs::metadata(&path).ok();
            let ours = file.metadata().map_err(|e| Error::io(&path, e))?;
            if current.is_some_and(|c| c.dev() == ours.dev() && c.ino() == ours.ino()) {
                file.set_len(0)
                    .and_then(|()| writeln!(file, "{}", std::process::id()))
                    .map_err(|e| Error::io(&path, e))?;
                return Ok(Self { path, file });
            }
        }
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        // Removed while still locked: a run that opened it meanwhile sees it gone.
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

fn temp_name(target: &Path, kind: &str) -> PathBuf {
    beside(target, &format!("kn-{kind}-{}", std::process::id()))
}

/// Cleans up after killed runs on `out`; call it holding `out`'s [`OutputLock`], so that
/// nothing found is in use. A `.NAME.kn-old-PID` directory (the old output of a
/// replacement killed half-way, on a file system without atomic exchange) is moved back
/// to `out` when `out` is missing, else removed; `.NAME.kn-partial-PID` files and
/// directories (unfinished outputs) are removed. Returns one line per thing done.
pub fn recover_leftovers(out: &Path) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    if is_stdout(out) {
        return Ok(notes);
    }
    let target = resolve(out)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let folder = folder_of(&target);
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Ok(notes);
    };
    let (partial, old) = (format!(".{name}.kn-partial-"), format!(".{name}.kn-old-"));
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if file_name.starts_with(&old) && std::fs::symlink_metadata(&target).is_err() {
            std::fs::rename(&path, &target).map_err(|e| Error::io(&path, e))?;
            notes.push(format!(
                "{}: restored from {} (left by a killed run)",
                out.display(),
                path.display()
            ));
        } else if file_name.starts_with(&old) || file_name.starts_with(&partial) {
            remove_any(&path)?;
            notes.push(format!("removed {} (left by a killed run)", path.display()));
        }
    }
    Ok(notes)
}

fn remove_any(path: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
    .map_err(|e| Error::io(path, e))
}

/// In debug builds, `KN_TEST_ABORT_AT=POINT` aborts the process at that point of an
/// output's replacement, so tests can check what a kill there leaves. Test-only: release
/// builds ignore it.
pub fn test_abort_point(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var_os("KN_TEST_ABORT_AT").is_some_and(|p| p == point) {
        std::process::abort();
    }
    let _ = point;
}

/// A file written under `.NAME.kn-partial-PID` beside its output and renamed into place
/// by [`PartialFile::commit`]: an output is whole or absent, never half-written. Removed
/// if dropped before commit; a killed run's is removed by the next run's
/// [`recover_leftovers`].
#[derive(Debug)]
pub struct PartialFile {
    out: PathBuf,
    target: PathBuf,
    partial: PathBuf,
    file: Option<File>,
}

impl PartialFile {
    /// Creates the partial file of `out`.
    pub fn create(out: &Path) -> Result<Self> {
        let target = resolve(out)?;
        let partial = temp_name(&target, "partial");
        let file = File::create(&partial).map_err(|e| Error::io(out, e))?;
        Ok(Self {
            out: out.to_path_buf(),
            target,
            partial,
            file: Some(file),
        })
    }

    /// The file to write.
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("not yet committed")
    }

    /// Syncs the file and renames it to the output.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("committed once");
        file.sync_all().map_err(|e| Error::io(&self.out, e))?;
        drop(file);
        test_abort_point("before-rename");
        std::fs::rename(&self.partial, &self.target).map_err(|e| Error::io(&self.out, e))?;
        sync_dir(folder_of(&self.target));
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

/// Writes `bytes` as the whole of `out`, through a [`PartialFile`].
pub fn write_whole(out: &Path, bytes: &[u8]) -> Result<()> {
    let partial = PartialFile::create(out)?;
    let mut file = partial.file();
    file.write_all(bytes).map_err(|e| Error::io(out, e))?;
    partial.commit()
}

fn sync_dir(dir: &Path) {
    // Durability of the rename only: a failure here loses nothing already written.
    let _ = File::open(dir).and_then(|d| d.sync_all());
}

/// A directory output being built as `.NAME.kn-partial-PID` beside its final place,
/// then swapped in whole by [`StagedDir::commit`]. Removed if dropped before.
#[derive(Debug)]
pub struct StagedDir {
    out: PathBuf,
    target: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Creates the staging directory of `out`. An existing `out` must be a directory.
    pub fn create(out: &Path) -> Result<Self> {
        let target = resolve(out)?;
        if let Ok(meta) = std::fs::symlink_metadata(&target) {
            if !meta.is_dir() {
                return Err(Error::output(
                    out,
                    "exists and is not a directory; kn replaces only a directory here \
                     (remove it, or choose another output)",
                ));
            }
        }
        let path = temp_name(&target, "partial");
        if std::fs::symlink_metadata(&path).is_ok() {
            remove_any(&path)?;
        }
        std::fs::create_dir_all(&path).map_err(|e| Error::io(out, e))?;
        Ok(Self {
            out: out.to_path_buf(),
            target,
            path,
            committed: false,
        })
    }

    /// The staging directory to fill.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts the staged directory at the output. Replacing an existing one is a single
    /// `renameat2(RENAME_EXCHANGE)`, so a kill at any point leaves a complete directory
    /// there, the old or the new; the old one, then under the staging name, is removed
    /// after. On a file system without the exchange the old one is first moved to
    /// `.NAME.kn-old-PID` (a kill between the two renames leaves it there, and the
    /// next run on the output moves it back).
    pub fn commit(mut self) -> Result<()> {
        sync_dir(&self.path);
        let folder = folder_of(&self.target).to_path_buf();
        test_abort_point("before-swap");
        if std::fs::symlink_metadata(&self.target).is_ok() {
            match exchange(&self.path, &self.target) {
                Ok(()) => {
                    self.committed = true;
                    sync_dir(&folder);
                    test_abort_point("after-swap");
                    // The staging name now holds the old directory.
                    remove_any(&self.path)?;
                }
                Err(e) if exchange_unsupported(&e) => {
                    let aside = temp_name(&self.target, "old");
                    std::fs::rename(&self.target, &aside).map_err(|e| Error::io(&self.out, e))?;
                    test_abort_point("between-renames");
                    if let Err(e) = std::fs::rename(&self.path, &self.target) {
                        let _ = std::fs::rename(&aside, &self.target);
                        return Err(Error::io(&self.out, e));
                    }
                    self.committed = true;
                    sync_dir(&folder);
                    remove_any(&aside)?;
                }
                Err(e) => return Err(Error::io(&self.out, e)),
            }
        } else {
            std::fs::rename(&self.path, &self.target).map_err(|e| Error::io(&self.out, e))?;
            self.committed = true;
            sync_dir(&folder);
        }
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths, relative to the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// The errors of a kernel or file system that has no atomic exchange.
fn exchange_unsupported(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(code) if code == libc::EINVAL || code == libc::ENOSYS || code == libc::EOPNOTSUPP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_that_is_an_input_is_refused_under_any_name() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("facts.jsonl");
        std::fs::write(&input, "{}\n").unwrap();
        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        let hard = dir.path().join("hard.jsonl");
        std::fs::hard_link(&input, &hard).unwrap();
        for out in [&input, &link, &hard] {
            let err = refuse_inputs(out, std::slice::from_ref(&input)).unwrap_err();
            assert!(err.to_string().contains("is also an input"), "{err}");
        }
        // A directory output holding an input.
        assert!(refuse_inputs(dir.path(), std::slice::from_ref(&input)).is_err());
        assert!(refuse_inputs(&dir.path().join("other.jsonl"), &[input]).is_ok());
    }

    #[test]
    fn a_second_lock_names_the_first_holder_and_a_dropped_lock_is_free_again() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.jsonl");
        let first = OutputLock::acquire(&out).unwrap();
        let err = OutputLock::acquire(&out).unwrap_err().to_string();
        assert!(
            err.contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        drop(first);
        assert!(!dir.path().join(".r.jsonl.kn-lock").exists());
        OutputLock::acquire(&out).unwrap();
    }

    #[test]
    fn a_staged_directory_replaces_the_old_one_whole() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("old"), "old").unwrap();
        let staged = StagedDir::create(&out).unwrap();
        std::fs::write(staged.path().join("new"), "new").unwrap();
        staged.commit().unwrap();
        assert!(out.join("new").is_file() && !out.join("old").exists());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the output is left");
    }

    #[test]
    fn leftovers_are_restored_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("model");
        let old = dir.path().join(".model.kn-old-99999");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("f"), "x").unwrap();
        std::fs::write(dir.path().join(".model.kn-partial-99998"), "x").unwrap();
        let notes = recover_leftovers(&out).unwrap();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(out.join("f").is_file());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
