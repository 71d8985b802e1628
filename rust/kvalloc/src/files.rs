//! Reading the text files kvalloc is pointed at (model configs, traces) without hanging or
//! aborting on what a path can name besides a regular file.

use std::io::{self, Read};
use std::path::Path;

/// The text of the regular file at `path`. A directory, FIFO, socket or device is an error,
/// found without blocking (a FIFO opened for reading would wait for a writer forever); so is
/// a file whose size cannot be allocated (an error, never an abort).
pub(crate) fn read_text(path: &Path) -> io::Result<String> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO does not wait for a writer; a regular file ignores the flag.
        options.custom_flags(libc::O_NONBLOCK);
    }
    let mut file = options.open(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::other("it is a directory"));
    }
    if !meta.is_file() {
        return Err(io::Error::other(
            "not a regular file (a FIFO, socket or device)",
        ));
    }
    let mut text = String::new();
    text.try_reserve_exact(meta.len() as usize)
        .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e))?;
    file.read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_files_and_refuses_directories_and_fifos_without_blocking() {
        let dir = std::env::temp_dir().join(format!("kvalloc-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.txt");
        std::fs::write(&file, "hello").unwrap();
        assert_eq!(read_text(&file).unwrap(), "hello");
        assert!(read_text(&dir)
            .unwrap_err()
            .to_string()
            .contains("directory"));
        assert!(read_text(&dir.join("missing")).is_err());
        #[cfg(unix)]
        {
            let fifo = dir.join("fifo");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let e = read_text(&fifo).unwrap_err();
            assert!(e.to_string().contains("FIFO"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
