//! Reading files named by a manifest without ever leaving the bundle folder.
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::{Error, ErrorKind, Result};

/// Resolve `name` (from manifest field `field`) inside `dir`, refusing absolute
/// paths, `..`, and anything (symlinks included) that resolves outside `dir`.
pub fn resolve_in_bundle(dir: &Path, name: &str, field: &str) -> Result<PathBuf> {
    let rel = Path::new(name);
    if name.is_empty() {
        return Err(Error::bundle(format!("{field}: empty file name")));
    }
    if rel.is_absolute() || name.starts_with('/') || name.starts_with('\\') {
        return Err(Error::bundle(format!(
            "{field}: file name {name:?} is absolute; it must be relative to the bundle folder"
        )));
    }
    for part in rel.components() {
        match part {
            Component::Normal(_) => {}
            Component::ParentDir => {
                return Err(Error::bundle(format!(
                    "{field}: file name {name:?} contains '..'; it must stay inside the bundle folder"
                )))
            }
            _ => return Err(Error::bundle(format!("{field}: file name {name:?} is not a plain relative path"))),
        }
    }
    let root = dir.canonicalize().map_err(|e| Error::io(dir, &e))?;
    let joined = root.join(rel);
    let real = joined.canonicalize().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::bundle(format!("{field}: file {} does not exist", joined.display()))
        } else {
            Error::io(&joined, &e)
        }
    })?;
    if !real.starts_with(&root) {
        return Err(Error::bundle(format!(
            "{field}: file name {name:?} resolves to {}, outside the bundle folder",
            real.display()
        )));
    }
    if !real.is_file() {
        return Err(Error::bundle(format!("{field}: {} is not a regular file", real.display())));
    }
    Ok(real)
}

/// Read a whole file, refusing files larger than `limit` bytes before reading them.
pub fn read_limited(path: &Path, limit: u64, field: &str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, &e))?;
    let len = file.metadata().map_err(|e| Error::io(path, &e))?.len();
    if len > limit {
        return Err(Error::new(
            ErrorKind::Bundle,
            format!("{field}: {} is {len} bytes, over the limit of {limit} bytes", path.display()),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, &e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::bundle(format!("{field}: {} grew past the size limit while reading", path.display())));
    }
    Ok(bytes)
}
