//! `unsafe` is confined to `src/kernels/`: the crate root denies `unsafe_code` and
//! allows it on `mod kernels;` alone, and no other module lifts the lint or uses the
//! keyword, so safe code everywhere else cannot break a kernel's contract.

use std::fs;
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `line` without its `//` comment (doc comments included).
fn code(line: &str) -> &str {
    line.split("//").next().unwrap_or("")
}

/// Whether `line`, its `//` comment cut off, holds `unsafe` as a word.
fn uses_unsafe(line: &str) -> bool {
    let code = code(line);
    let word = |c: char| c.is_alphanumeric() || c == '_';
    code.match_indices("unsafe").any(|(i, _)| {
        let before = code[..i].chars().next_back();
        let after = code[i + "unsafe".len()..].chars().next();
        !before.is_some_and(word) && !after.is_some_and(word)
    })
}

#[test]
fn only_the_kernels_module_may_use_unsafe() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = fs::read_to_string(src.join("lib.rs")).unwrap();
    for lint in [
        "#![deny(unsafe_code)]",
        "#![deny(unsafe_op_in_unsafe_fn)]",
        "#![deny(clippy::undocumented_unsafe_blocks)]",
    ] {
        assert!(lib.contains(lint), "lib.rs lost {lint}");
    }
    assert!(
        lib.contains("#[allow(unsafe_code)]\nmod kernels;"),
        "lib.rs must allow unsafe on `mod kernels;`"
    );
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let kernels = src.join("kernels");
    let mut lifted = Vec::new();
    let mut used = Vec::new();
    for path in &files {
        let text = fs::read_to_string(path).unwrap();
        let name = path.strip_prefix(&src).unwrap().display().to_string();
        for (n, line) in text.lines().enumerate() {
            let code = code(line);
            let lint = code.contains("unsafe_code") || code.contains("unsafe_op_in_unsafe_fn");
            if lint && !code.contains("deny(") && !code.contains("forbid(") {
                lifted.push(format!("{name}:{}: {line}", n + 1));
            }
            if !path.starts_with(&kernels) && uses_unsafe(line) {
                used.push(format!("{name}:{}: {line}", n + 1));
            }
        }
    }
    assert_eq!(
        lifted.len(),
        1,
        "only lib.rs's `mod kernels;` may allow unsafe code: {lifted:#?}"
    );
    assert!(lifted[0].starts_with("lib.rs:"), "{lifted:#?}");
    assert!(used.is_empty(), "unsafe outside src/kernels/: {used:#?}");
    assert!(
        files.iter().any(|f| f.starts_with(&kernels)),
        "no src/kernels/ found"
    );
    assert!(uses_unsafe("    unsafe { f() }") && !uses_unsafe("#![deny(unsafe_code)]"));
}
