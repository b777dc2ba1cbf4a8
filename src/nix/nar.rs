//! NAR, the Nix archive: the one serialisation of a store path that every
//! hash, signature and transfer is defined over. The writer dumps a directory
//! tree exactly as `nix-store --dump` does (entries sorted by name bytes,
//! executables marked, symlinks kept). The parser is push-based and sans-IO:
//! it is fed chunks, validates as it goes (magic, padding, token order,
//! entry names, sort order) with memory bounded by the nesting depth, reports
//! what it sees as events, and says where the archive ends, which matters
//! when a NAR arrives in the middle of a protocol stream with no length.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

pub const MAGIC: &[u8] = b"nix-archive-1";
/// Longest entry name (NAME_MAX) and symlink target (PATH_MAX) we accept.
pub const MAX_NAME: usize = 255;
pub const MAX_TARGET: usize = 4095;
/// Deeper nesting than this is refused so parser memory stays bounded.
pub const MAX_DEPTH: usize = 512;

#[derive(Debug, Error)]
pub enum NarError {
    #[error("not a NAR: bad magic")]
    BadMagic,
    #[error("malformed NAR at byte {pos}: expected {expected}")]
    Unexpected { pos: u64, expected: &'static str },
    #[error("NAR padding at byte {0} is not zero")]
    BadPadding(u64),
    #[error("NAR string at byte {pos} is {len} bytes, over the limit of {max}")]
    TooLong { pos: u64, len: u64, max: usize },
    #[error("NAR entry name {0:?} is not allowed")]
    BadName(String),
    #[error("NAR directory entries are not sorted or not unique at {0:?}")]
    NotSorted(String),
    #[error("NAR nests deeper than {MAX_DEPTH} directories")]
    TooDeep,
    #[error("NAR is truncated after {0} bytes")]
    Truncated(u64),
    #[error("NAR has data after its end")]
    Trailing,
    #[error("NAR I/O: {0}")]
    Io(#[from] io::Error),
}

/// What the parser has seen. Names are of the entry within its directory;
/// the root node has an empty name.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    Directory { name: &'a [u8] },
    DirectoryEnd,
    File { name: &'a [u8], executable: bool, size: u64 },
    FileData(&'a [u8]),
    FileEnd,
    Symlink { name: &'a [u8], target: &'a [u8] },
}

// ------------------------------------------------------------------ writer

fn write_str<W: Write>(w: &mut W, s: &[u8]) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s)?;
    write_pad(w, s.len() as u64)
}

fn write_pad<W: Write>(w: &mut W, len: u64) -> io::Result<()> {
    let pad = (8 - (len % 8) as usize) % 8;
    w.write_all(&[0u8; 8][..pad])
}

/// Writes the NAR of `path` (file, directory or symlink) to `w`, as
/// `nix-store --dump` does. File contents are streamed, never held whole.
pub fn dump_path<W: Write>(path: &Path, w: &mut W) -> io::Result<()> {
    write_str(w, MAGIC)?;
    dump_node(path, w, 0)
}

fn dump_node<W: Write>(path: &Path, w: &mut W, depth: usize) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let meta = std::fs::symlink_metadata(path)?;
    write_str(w, b"(")?;
    write_str(w, b"type")?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        write_str(w, b"symlink")?;
        write_str(w, b"target")?;
        write_str(w, std::fs::read_link(path)?.as_os_str().as_bytes())?;
    } else if ft.is_file() {
        write_str(w, b"regular")?;
        if meta.permissions().mode() & 0o100 != 0 {
            write_str(w, b"executable")?;
            write_str(w, b"")?;
        }
        write_str(w, b"contents")?;
        let size = meta.len();
        w.write_all(&size.to_le_bytes())?;
        let mut f = std::fs::File::open(path)?;
        let copied = io::copy(&mut (&mut f).take(size), w)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} shrank while being archived", path.display()),
            ));
        }
        write_pad(w, size)?;
    } else if ft.is_dir() {
        if depth >= MAX_DEPTH {
            return Err(io::Error::other(format!("{} nests too deep", path.display())));
        }
        write_str(w, b"directory")?;
        let mut names: Vec<_> =
            std::fs::read_dir(path)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            write_str(w, b"entry")?;
            write_str(w, b"(")?;
            write_str(w, b"name")?;
            write_str(w, name.as_bytes())?;
            write_str(w, b"node")?;
            dump_node(&path.join(&name), w, depth + 1)?;
            write_str(w, b")")?;
        }
    } else {
        return Err(io::Error::other(format!("{} is not a file, directory or symlink", path.display())));
    }
    write_str(w, b")")
}

/// Streams the NAR of `path` into an async writer. The walk runs on a
/// blocking thread and hands over chunks through a small channel, so memory
/// stays bounded whatever the size of the tree.
pub async fn dump_path_async<W: AsyncWrite + Unpin>(path: &Path, w: &mut W) -> io::Result<u64> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let path = path.to_owned();
    let walker = tokio::task::spawn_blocking(move || {
        let mut cw = ChannelWriter { tx, buf: Vec::with_capacity(CHUNK) };
        dump_path(&path, &mut cw)?;
        cw.flush()
    });
    let mut total = 0u64;
    while let Some(chunk) = rx.recv().await {
        total += chunk.len() as u64;
        w.write_all(&chunk).await?;
    }
    walker.await.map_err(io::Error::other)??;
    w.flush().await?;
    Ok(total)
}

const CHUNK: usize = 64 * 1024;

struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            self.tx
                .blocking_send(chunk)
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "NAR reader went away"))?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------ parser

/// Which token the grammar wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Magic,
    Open,
    Type,
    TypeValue,
    /// After `regular`: `executable` or `contents`.
    ExecOrContents,
    ExecEmpty,
    Contents,
    SymlinkTarget,
    SymlinkTargetValue,
    /// Inside a directory: `entry` or `)`.
    EntryOrClose,
    EntryOpen,
    EntryName,
    EntryNameValue,
    EntryNode,
    /// The `)` closing a regular file or symlink node.
    NodeClose,
    /// The `)` closing an `entry ( … )`.
    EntryClose,
    Done,
}

/// How the bytes in front of us are to be read.
#[derive(Debug, Clone, Copy)]
enum Lex {
    Len { have: usize },
    Small { len: usize },
    Contents { left: u64 },
    Pad { left: usize },
}

struct Dir {
    last_name: Option<Vec<u8>>,
}

pub struct NarParser {
    want: Want,
    lex: Lex,
    len_buf: [u8; 8],
    small: Vec<u8>,
    /// The length of the token whose padding is being read.
    pending_pad_for: u64,
    pos: u64,
    dirs: Vec<Dir>,
    /// Name of the entry whose node comes next (empty for the root).
    entry_name: Vec<u8>,
    executable: bool,
}

impl Default for NarParser {
    fn default() -> Self {
        Self::new()
    }
}

impl NarParser {
    pub fn new() -> Self {
        NarParser {
            want: Want::Magic,
            lex: Lex::Len { have: 0 },
            len_buf: [0; 8],
            small: Vec::new(),
            pending_pad_for: 0,
            pos: 0,
            dirs: Vec::new(),
            entry_name: Vec::new(),
            executable: false,
        }
    }

    pub fn is_done(&self) -> bool {
        self.want == Want::Done
    }

    /// Bytes consumed so far: the NAR's size once it is done.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Feeds bytes; returns how many were consumed. Fewer than `data.len()`
    /// are consumed only when the NAR ended inside `data`.
    pub fn feed(&mut self, data: &[u8], sink: &mut impl FnMut(Event<'_>)) -> Result<usize, NarError> {
        let mut i = 0;
        loop {
            // A token whose padding is complete (or empty) ends before any
            // more input is needed, so the end of a NAR is seen at once.
            if let Lex::Pad { left: 0 } = self.lex {
                self.lex = Lex::Len { have: 0 };
                self.end_token(sink)?;
                continue;
            }
            if i == data.len() || self.want == Want::Done {
                break;
            }
            match self.lex {
                Lex::Len { have } => {
                    let n = (8 - have).min(data.len() - i);
                    self.len_buf[have..have + n].copy_from_slice(&data[i..i + n]);
                    i += n;
                    self.pos += n as u64;
                    if have + n == 8 {
                        let len = u64::from_le_bytes(self.len_buf);
                        self.start_token(len, sink)?;
                    } else {
                        self.lex = Lex::Len { have: have + n };
                    }
                }
                Lex::Small { len } => {
                    let n = (len - self.small.len()).min(data.len() - i);
                    self.small.extend_from_slice(&data[i..i + n]);
                    i += n;
                    self.pos += n as u64;
                    if self.small.len() == len {
                        self.begin_pad(len as u64);
                    }
                }
                Lex::Contents { left } => {
                    let n = (left.min((data.len() - i) as u64)) as usize;
                    sink(Event::FileData(&data[i..i + n]));
                    i += n;
                    self.pos += n as u64;
                    let left = left - n as u64;
                    self.lex = Lex::Contents { left };
                    if left == 0 {
                        self.begin_pad(self.pending_pad_for);
                    }
                }
                Lex::Pad { left } => {
                    let n = left.min(data.len() - i);
                    if data[i..i + n].iter().any(|&b| b != 0) {
                        return Err(NarError::BadPadding(self.pos));
                    }
                    i += n;
                    self.pos += n as u64;
                    self.lex = Lex::Pad { left: left - n };
                }
            }
        }
        Ok(i)
    }

    /// Call at end of input: an unfinished NAR is truncated.
    pub fn finish(&self) -> Result<u64, NarError> {
        if self.is_done() { Ok(self.pos) } else { Err(NarError::Truncated(self.pos)) }
    }

    fn start_token(&mut self, len: u64, sink: &mut impl FnMut(Event<'_>)) -> Result<(), NarError> {
        let tok_pos = self.pos - 8;
        if self.want == Want::Contents {
            sink(Event::File { name: &self.entry_name, executable: self.executable, size: len });
            self.pending_pad_for = len;
            if len == 0 {
                self.begin_pad(0);
            } else {
                self.lex = Lex::Contents { left: len };
            }
            return Ok(());
        }
        let max = match self.want {
            Want::SymlinkTargetValue => MAX_TARGET,
            Want::EntryNameValue => MAX_NAME,
            _ => 16, // every keyword is short
        };
        if len > max as u64 {
            return Err(if max == 16 {
                self.unexpected_at(tok_pos)
            } else {
                NarError::TooLong { pos: tok_pos, len, max }
            });
        }
        self.small.clear();
        if len == 0 {
            self.begin_pad(0);
        } else {
            self.lex = Lex::Small { len: len as usize };
        }
        Ok(())
    }

    fn begin_pad(&mut self, len: u64) {
        self.lex = Lex::Pad { left: ((8 - (len % 8)) % 8) as usize };
    }

    fn unexpected_at(&self, pos: u64) -> NarError {
        let expected = match self.want {
            Want::Magic => return NarError::BadMagic,
            Want::Open => "'('",
            Want::Type => "'type'",
            Want::TypeValue => "'regular', 'symlink' or 'directory'",
            Want::ExecOrContents => "'executable' or 'contents'",
            Want::ExecEmpty => "an empty string after 'executable'",
            Want::Contents => "file contents",
            Want::SymlinkTarget => "'target'",
            Want::SymlinkTargetValue => "a symlink target",
            Want::EntryOrClose => "'entry' or ')'",
            Want::EntryOpen => "'(' opening an entry",
            Want::EntryName => "'name'",
            Want::EntryNameValue => "an entry name",
            Want::EntryNode => "'node'",
            Want::NodeClose => "')'",
            Want::EntryClose => "')' closing an entry",
            Want::Done => "the end of the NAR",
        };
        NarError::Unexpected { pos, expected }
    }

    /// A node (file, symlink or directory) has ended.
    fn node_done(&mut self) {
        self.want = if self.dirs.is_empty() { Want::Done } else { Want::EntryClose };
    }

    fn end_token(&mut self, sink: &mut impl FnMut(Event<'_>)) -> Result<(), NarError> {
        let tok = std::mem::take(&mut self.small);
        let res = self.on_token(&tok, sink);
        self.small = tok;
        res
    }

    fn on_token(&mut self, t: &[u8], sink: &mut impl FnMut(Event<'_>)) -> Result<(), NarError> {
        let bad = |s: &Self| Err(s.unexpected_at(s.pos));
        match self.want {
            Want::Magic if t == MAGIC => self.want = Want::Open,
            Want::Open if t == b"(" => self.want = Want::Type,
            Want::Type if t == b"type" => self.want = Want::TypeValue,
            Want::TypeValue => match t {
                b"regular" => {
                    self.executable = false;
                    self.want = Want::ExecOrContents;
                }
                b"symlink" => self.want = Want::SymlinkTarget,
                b"directory" => {
                    if self.dirs.len() >= MAX_DEPTH {
                        return Err(NarError::TooDeep);
                    }
                    sink(Event::Directory { name: &self.entry_name });
                    self.dirs.push(Dir { last_name: None });
                    self.want = Want::EntryOrClose;
                }
                _ => return bad(self),
            },
            Want::ExecOrContents if t == b"executable" && !self.executable => self.want = Want::ExecEmpty,
            Want::ExecOrContents if t == b"contents" => self.want = Want::Contents,
            Want::ExecEmpty if t.is_empty() => {
                self.executable = true;
                self.want = Want::ExecOrContents;
            }
            // The contents token ends here, after its padding.
            Want::Contents => {
                sink(Event::FileEnd);
                self.want = Want::NodeClose;
            }
            Want::SymlinkTarget if t == b"target" => self.want = Want::SymlinkTargetValue,
            Want::SymlinkTargetValue => {
                if t.is_empty() || t.contains(&0) {
                    return Err(NarError::Unexpected { pos: self.pos, expected: "a valid symlink target" });
                }
                sink(Event::Symlink { name: &self.entry_name, target: t });
                self.want = Want::NodeClose;
            }
            Want::NodeClose if t == b")" => self.node_done(),
            Want::EntryOrClose if t == b"entry" => self.want = Want::EntryOpen,
            Want::EntryOrClose if t == b")" => {
                self.dirs.pop();
                sink(Event::DirectoryEnd);
                self.node_done();
            }
            Want::EntryOpen if t == b"(" => self.want = Want::EntryName,
            Want::EntryName if t == b"name" => self.want = Want::EntryNameValue,
            Want::EntryNameValue => {
                if t.is_empty() || t == b"." || t == b".." || t.contains(&b'/') || t.contains(&0) {
                    return Err(NarError::BadName(String::from_utf8_lossy(t).into_owned()));
                }
                let dir = self.dirs.last_mut().expect("inside a directory");
                if let Some(prev) = &dir.last_name
                    && prev.as_slice() >= t
                {
                    return Err(NarError::NotSorted(String::from_utf8_lossy(t).into_owned()));
                }
                dir.last_name = Some(t.to_vec());
                self.entry_name.clear();
                self.entry_name.extend_from_slice(t);
                self.want = Want::EntryNode;
            }
            Want::EntryNode if t == b"node" => self.want = Want::Open,
            Want::EntryClose if t == b")" => self.want = Want::EntryOrClose,
            _ => return bad(self),
        }
        if self.want == Want::EntryOrClose {
            self.entry_name.clear();
        }
        Ok(())
    }
}

/// Reads one NAR from a buffered async reader without reading past its end,
/// validating it and passing events to `sink`. Returns the NAR's size.
pub async fn read_nar<R: AsyncBufRead + Unpin>(r: &mut R, mut sink: impl FnMut(Event<'_>)) -> Result<u64, NarError> {
    let mut p = NarParser::new();
    while !p.is_done() {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Err(NarError::Truncated(p.position()));
        }
        let n = p.feed(buf, &mut sink)?;
        r.consume(n);
    }
    Ok(p.position())
}

/// Validates a complete NAR held in memory (small NARs, tests).
pub fn validate(bytes: &[u8]) -> Result<u64, NarError> {
    let mut p = NarParser::new();
    let n = p.feed(bytes, &mut |_| {})?;
    p.finish()?;
    if n != bytes.len() {
        return Err(NarError::Trailing);
    }
    Ok(n as u64)
}

/// Unpacks a NAR stream into `dest` (which must not exist), as
/// `nix-store --restore` does.
pub async fn restore<R: AsyncBufRead + Unpin>(r: &mut R, dest: &Path) -> Result<u64, NarError> {
    let mut state = Restore { stack: vec![], root: dest.to_owned(), file: None, err: None };
    let n = read_nar(r, |ev| {
        if state.err.is_none()
            && let Err(e) = state.on(ev)
        {
            state.err = Some(e);
        }
    })
    .await?;
    match state.err {
        Some(e) => Err(e.into()),
        None => Ok(n),
    }
}

struct Restore {
    stack: Vec<std::path::PathBuf>,
    root: std::path::PathBuf,
    file: Option<std::fs::File>,
    err: Option<io::Error>,
}

impl Restore {
    fn path_for(&self, name: &[u8]) -> std::path::PathBuf {
        use std::os::unix::ffi::OsStrExt;
        match self.stack.last() {
            None => self.root.clone(),
            Some(dir) => dir.join(std::ffi::OsStr::from_bytes(name)),
        }
    }

    fn on(&mut self, ev: Event<'_>) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        match ev {
            Event::Directory { name } => {
                let p = self.path_for(name);
                std::fs::create_dir(&p)?;
                self.stack.push(p);
            }
            Event::DirectoryEnd => {
                self.stack.pop();
            }
            Event::File { name, executable, .. } => {
                let p = self.path_for(name);
                let f = std::fs::OpenOptions::new().write(true).create_new(true).open(&p)?;
                let mode = if executable { 0o555 } else { 0o444 };
                f.set_permissions(std::fs::Permissions::from_mode(mode))?;
                self.file = Some(f);
            }
            Event::FileData(d) => self.file.as_mut().expect("file open").write_all(d)?,
            Event::FileEnd => {
                self.file = None;
            }
            Event::Symlink { name, target } => {
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), self.path_for(name))?
            }
        }
        Ok(())
    }
}

/// Writes a NAR string token to an async writer (used by protocol code).
pub async fn write_str_async<W: AsyncWrite + Unpin>(w: &mut W, s: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(16 + s.len());
    write_str(&mut buf, s)?;
    w.write_all(&buf).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::write(root.join("a.txt"), b"hello\n").unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(root.join("sub/deeper/eight888"), b"12345678").unwrap();
        std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
        d
    }

    fn nar_of(p: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        dump_path(p, &mut v).unwrap();
        v
    }

    #[test]
    fn parser_accepts_what_the_writer_writes_in_any_chunking() {
        let d = tree();
        let nar = nar_of(&d.path().join("root"));
        assert_eq!(validate(&nar).unwrap(), nar.len() as u64);
        for chunk in [1, 3, 7, 8, 13, 4096] {
            let mut p = NarParser::new();
            let mut files = 0;
            let mut data = 0;
            for c in nar.chunks(chunk) {
                assert_eq!(
                    p.feed(c, &mut |e| match e {
                        Event::File { .. } => files += 1,
                        Event::FileData(d) => data += d.len(),
                        _ => {}
                    })
                    .unwrap(),
                    c.len()
                );
            }
            assert!(p.is_done());
            assert_eq!((files, data), (4, 6 + 8 + 18));
        }
    }

    #[test]
    fn parser_stops_at_the_end_of_the_nar() {
        let d = tree();
        let mut nar = nar_of(&d.path().join("root/a.txt"));
        let len = nar.len();
        nar.extend_from_slice(b"next protocol message");
        let mut p = NarParser::new();
        assert_eq!(p.feed(&nar, &mut |_| {}).unwrap(), len);
        assert!(p.is_done());
        assert!(matches!(validate(&nar), Err(NarError::Trailing)));
    }

    #[tokio::test]
    async fn restore_then_dump_is_identity() {
        let d = tree();
        let nar = nar_of(&d.path().join("root"));
        let out = d.path().join("restored");
        let mut r = &nar[..];
        restore(&mut r, &out).await.unwrap();
        assert_eq!(nar_of(&out), nar);
        let mut streamed = Vec::new();
        let n = dump_path_async(&out, &mut streamed).await.unwrap();
        assert_eq!((n as usize, streamed), (nar.len(), nar));
    }

    fn token(s: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_str(&mut v, s).unwrap();
        v
    }

    fn nar_from_tokens(toks: &[&[u8]]) -> Vec<u8> {
        toks.iter().flat_map(|t| token(t)).collect()
    }

    fn dir_with(names: &[&[u8]]) -> Vec<u8> {
        let mut toks: Vec<&[u8]> = vec![MAGIC, b"(", b"type", b"directory"];
        for n in names {
            toks.extend_from_slice(&[
                b"entry", b"(", b"name", n, b"node", b"(", b"type", b"symlink", b"target", b"x", b")", b")",
            ]);
        }
        toks.push(b")");
        nar_from_tokens(&toks)
    }

    #[test]
    fn bad_nars_are_typed_errors() {
        assert!(matches!(validate(&token(b"nix-archive-2")), Err(NarError::BadMagic)));
        assert!(validate(&dir_with(&[b"a", b"b"])).is_ok());
        assert!(matches!(validate(&dir_with(&[b"b", b"a"])), Err(NarError::NotSorted(_))));
        assert!(matches!(validate(&dir_with(&[b"a", b"a"])), Err(NarError::NotSorted(_))));
        for name in [&b".."[..], b".", b"a/b", b"", b"a\0"] {
            assert!(matches!(validate(&dir_with(&[name])), Err(NarError::BadName(_))), "{name:?}");
        }
        let long = vec![b'a'; 256];
        assert!(matches!(validate(&dir_with(&[&long])), Err(NarError::TooLong { .. })));
        let good = dir_with(&[b"a"]);
        assert!(matches!(validate(&good[..good.len() - 3]), Err(NarError::Truncated(_))));
        let mut bad_pad = good.clone();
        // The padding byte right after the 1-byte name "a" (magic 24 bytes, then tokens).
        let at = good.windows(9).position(|w| w == [1, 0, 0, 0, 0, 0, 0, 0, b'a']).unwrap() + 9;
        bad_pad[at] = 1;
        assert!(matches!(validate(&bad_pad), Err(NarError::BadPadding(_))));
        let wrong_type = nar_from_tokens(&[MAGIC, b"(", b"type", b"fifo", b")"]);
        assert!(matches!(validate(&wrong_type), Err(NarError::Unexpected { .. })));
        let huge_keyword = [&token(MAGIC)[..], &u64::MAX.to_le_bytes()].concat();
        assert!(matches!(validate(&huge_keyword), Err(NarError::Unexpected { .. })));
        let twice_exec = nar_from_tokens(&[
            MAGIC,
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"executable",
            b"",
            b"contents",
            b"",
            b")",
        ]);
        assert!(validate(&twice_exec).is_err());
    }

    #[test]
    fn depth_is_bounded() {
        let mut toks: Vec<&[u8]> = vec![MAGIC];
        for _ in 0..=MAX_DEPTH {
            toks.extend_from_slice(&[b"(", b"type", b"directory", b"entry", b"(", b"name", b"d", b"node"]);
        }
        assert!(matches!(validate(&nar_from_tokens(&toks)), Err(NarError::TooDeep)));
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = validate(&bytes);
            let mut with_magic = token(MAGIC);
            with_magic.extend_from_slice(&bytes);
            let _ = validate(&with_magic);
        }

        #[test]
        fn parser_never_panics_on_mutations(at in 0usize..400, byte in any::<u8>(), cut in 0usize..400) {
            let mut nar = dir_with(&[b"a", b"bb", b"ccc"]);
            let at = at % nar.len();
            nar[at] = byte;
            let _ = validate(&nar);
            let _ = validate(&nar[..cut.min(nar.len())]);
        }
    }
}
