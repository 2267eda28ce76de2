//! Output files, replaced whole or not at all: the new content goes to a temporary file
//! beside the target, which is renamed over it only once completely written, so a
//! failing write (disk full, a file-size limit) leaves an existing file as it was.
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Write `bytes` to `path`, replacing it whole or leaving it untouched.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_with(path, |file| file.write_all(bytes))
}

/// Fill a temporary file beside `path` with `fill`, then rename it over `path`; on any
/// error the temporary file is removed and `path` is left as it was.
pub fn replace_with(path: &Path, fill: impl FnOnce(&mut File) -> io::Result<()>) -> Result<()> {
    let target = resolve_link(path);
    let existing = fs::metadata(&target).ok();
    if let Some(meta) = &existing {
        // A device or FIFO (`-o /dev/stdout`) has no content to lose and cannot be renamed over.
        if !meta.is_file() && !meta.is_dir() {
            let mut file = OpenOptions::new().write(true).open(&target).map_err(|e| Error::io(path, &e))?;
            return fill(&mut file).and_then(|_| file.flush()).map_err(|e| Error::io(path, &e));
        }
    }
    let (tmp, mut file) = create_temp(&target).map_err(|e| Error::io(path, &e))?;
    let written = (|| {
        if let Some(meta) = existing.as_ref().filter(|m| m.is_file()) {
            file.set_permissions(meta.permissions())?;
        }
        fill(&mut file)?;
        // On disk before the rename, so a crash cannot leave an empty file in its place.
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &target)
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, &e)
    })
}

/// Print `text` on stdout. A closed pipe (`| head`, `| true`) is no error: the reader
/// has what it wanted. Other write errors (`> /dev/full`) are.
pub fn print_stdout(text: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(Error::io(Path::new("stdout"), &e)),
        _ => Ok(()),
    }
}

/// Fail early, before the work that fills it, when `path` cannot become an output file:
/// its directory must exist and it must not be a directory itself.
pub fn check_path(path: &Path) -> Result<()> {
    let target = resolve_link(path);
    if target.is_dir() {
        return Err(Error::invalid(format!("output {}: is a directory", path.display())));
    }
    let dir = parent_dir(&target);
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(Error::invalid(format!("output {}: {} is not a directory", path.display(), dir.display()))),
        Err(e) => Err(Error::io(dir, &e).context(format!("output {}", path.display()))),
    }
}

/// The file a symbolic link points to (so the link is kept and its target replaced);
/// `path` itself when it is no link or a dangling one.
fn resolve_link(path: &Path) -> PathBuf {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

/// The directory `path` is (to be) in; "." for a bare file name.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// A new file `.NAME.PID.I.tmp` beside `target` (same directory, so the rename is atomic).
fn create_temp(target: &Path) -> io::Result<(PathBuf, File)> {
    let name = target.file_name().ok_or_else(|| io::Error::other("not a file name"))?;
    let dir = parent_dir(target);
    let mut last = None;
    for i in 0..100 {
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{}.{i}.tmp", std::process::id()));
        let tmp = dir.join(tmp_name);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free temporary file name")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_failing_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.safetensors");
        fs::write(&path, b"old content").unwrap();
        let e = replace_with(&path, |file| {
            file.write_all(b"half of the new")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(e.message().contains("out.safetensors") && e.message().contains("disk full"), "{}", e.message());
        assert_eq!(fs::read(&path).unwrap(), b"old content");
        assert_eq!(names(dir.path()), ["out.safetensors"]);

        write_file(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(names(dir.path()), ["out.safetensors"]);
    }

    #[test]
    fn links_keep_pointing_at_the_replaced_file() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.csv");
        fs::write(&real, b"old").unwrap();
        #[cfg(unix)]
        {
            let link = dir.path().join("link.csv");
            std::os::unix::fs::symlink(&real, &link).unwrap();
            write_file(&link, b"new").unwrap();
            assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
            assert_eq!(fs::read(&real).unwrap(), b"new");
        }
        // A directory is not replaced by a file.
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        assert!(write_file(&sub, b"x").is_err());
        assert!(sub.is_dir());
    }
}
