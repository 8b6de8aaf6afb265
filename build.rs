//! Builds ParaRel (`data/pararel`) into the binary, so that `kn pararel` needs no path
//! after `cargo install`: one `include_bytes!` per relation file, listed here because
//! Rust has no way to include a directory.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/pararel");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut code = String::new();
    for kind in ["patterns", "facts"] {
        let dir = root.join(kind);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("reading data/pararel").path())
            .filter(|path| path.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        // Sorted, so that the generated file (and the binary) does not depend on the
        // order the file system lists a directory in.
        files.sort();
        let _ = writeln!(
            code,
            "/// ParaRel's `{kind}/` files: (relation, contents).\npub static {}: &[(&str, &[u8])] = &[",
            kind.to_uppercase()
        );
        for path in files {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("a relation file name in UTF-8");
            let _ = writeln!(
                code,
                "    ({stem:?}, include_bytes!({:?})),",
                path.display().to_string()
            );
        }
        code.push_str("];\n");
    }
    let out = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("pararel_bundled.rs");
    std::fs::write(&out, code).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
}
