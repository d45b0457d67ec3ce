//! Streaming one stored file as [`std::io::Read`] without materializing it.

use std::io::Read;

use dsv_store::{FileObject, Store};

/// Reads a stored file in windows (each chunk's hash is verified as it is
/// read).
pub struct FileReader<'a> {
    store: &'a Store,
    file: FileObject,
    pos: u64,
    buf: Vec<u8>,
    at: usize,
}

/// Bytes fetched per window.
const WINDOW: usize = 1 << 20;

impl<'a> FileReader<'a> {
    /// A reader over `file`.
    pub fn new(store: &'a Store, file: FileObject) -> Self {
        Self {
            store,
            file,
            pos: 0,
            buf: Vec::new(),
            at: 0,
        }
    }
    /// The file's size.
    pub fn size(&self) -> u64 {
        self.file.size
    }
}

impl Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.buf.len() {
            if self.pos >= self.file.size {
                return Ok(0);
            }
            let len = (self.file.size - self.pos).min(WINDOW as u64) as usize;
            self.buf = self
                .store
                .read_file_range(&self.file, self.pos, len)
                .map_err(std::io::Error::other)?;
            self.pos += self.buf.len() as u64;
            self.at = 0;
            if self.buf.is_empty() {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
