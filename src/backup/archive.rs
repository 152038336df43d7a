//! The archive of an agent's backup: a zstd-compressed tar of `spec.backup.paths`, packed by
//! `agentry sidecar` inside the agent's pod and unpacked by it on restore.
//!
//! Format: a single zstd frame (level 3, one thread, 2 MiB window, content checksum) holding a
//! GNU tar. Each entry is named by its absolute path without the leading `/`
//! (`/data/state.json` → `data/state.json`), so a restore puts every file back where it was.
//! Regular files, directories and symlinks are stored with their permission bits and mtime
//! (whole seconds); sockets, fifos and devices are skipped. Symlinks are stored as symlinks and
//! never followed, a root that is itself a symlink included. Ownership is not restored.
//!
//! A restore treats the archive as hostile. [`check`] runs every test without writing; the
//! caller, holding the verified archive in a local file, runs [`check`] and then [`unpack`] on a
//! second reader of the same file, so a hostile archive writes nothing. [`unpack`] checks each
//! entry again right before writing it and stops at the first refusal; the error carries how many
//! entries (in archive order) were already restored.
//!
//! A symlink is accepted (by [`pack`] and by a restore alike) when its target, resolved
//! lexically from the link's directory, lands inside one of the roots: an absolute target must
//! lie in a root and hold no `..`; a relative target may climb with leading `..` no higher than
//! the parent of the link's own root, and may not climb back after a name (`a/../b`). [`pack`]
//! refuses a link that a restore would refuse, so a backup that succeeds can be restored.
//!
//! The checks read the destination with `symlink_metadata`; they guard against a hostile archive
//! and against symlinks already in the destination, not against another process rewriting the
//! destination while the restore runs (restore before the agent starts).

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::Stream;

const ZSTD_LEVEL: i32 = 3;
/// 2 MiB, what level 3 uses on a stream; pinned so a decoder can refuse larger windows.
const WINDOW_LOG: u32 = 21;
/// How much one entry's headers (tar, GNU long name and link, PAX) may take in the tar stream.
const MAX_METADATA: u64 = 1 << 20;
/// The bytes [`pack_stream`] hands over at a time, and how many may wait in the pipe.
const CHUNK: usize = 64 * 1024;
const CHUNKS_IN_FLIGHT: usize = 8;
const BLOCK: u64 = 512;
/// Restored permission bits: setuid, setgid and sticky are dropped.
const MODE_MASK: u32 = 0o777;

/// What went wrong while packing or restoring; every message names the path or archive entry.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(
        "backup path {path} {problem}; list absolute paths such as /data/state in spec.backup.paths"
    )]
    BadPath {
        path: PathBuf,
        problem: &'static str,
    },
    #[error(
        "cannot read {path} while packing it: {source}; check that it exists and that the sidecar may read it"
    )]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "{path} shrank from {expected} to {read} bytes while it was packed; retry the backup when the agent is not rewriting it in place"
    )]
    Changed {
        path: PathBuf,
        expected: u64,
        read: u64,
    },
    #[error(
        "cannot pack symlink {path} -> {target}: the target {problem}, so a restore would refuse it; remove the link, point it inside spec.backup.paths, or add its target to them"
    )]
    UnsafeLink {
        path: PathBuf,
        target: PathBuf,
        problem: LinkProblem,
    },
    #[error(
        "writing the archive failed at {at}: {source}; the output or upload stopped, retry the backup"
    )]
    Write { at: String, source: io::Error },
    #[error(
        "the archive is unreadable at {entry}: {source}; it is corrupt or truncated, restore an older backup ({})",
        restored(.written)
    )]
    Corrupt {
        entry: String,
        written: u64,
        source: io::Error,
    },
    #[error(
        "refused archive entry {entry}: {reason}; do not restore this backup ({})",
        restored(.written)
    )]
    Refused {
        entry: String,
        reason: Refusal,
        written: u64,
    },
    #[error(
        "cannot restore archive entry {entry} to {path}: {source}; fix the destination (space, permissions) and retry ({})",
        restored(.written)
    )]
    Restore {
        entry: String,
        path: PathBuf,
        written: u64,
        source: io::Error,
    },
}

impl ArchiveError {
    /// How many entries a failed [`unpack`] had already restored (0 for [`check`] and packing).
    pub fn written(&self) -> u64 {
        match self {
            Self::Corrupt { written, .. }
            | Self::Refused { written, .. }
            | Self::Restore { written, .. } => *written,
            _ => 0,
        }
    }
}

/// The tail of a restore error: what the restore had written before it stopped.
fn restored(written: &u64) -> String {
    match written {
        0 => "no entry was restored".into(),
        n => format!("the {n} entries before it in the archive were restored, none after"),
    }
}

/// Why a restore refused an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "its name is empty, absolute, or holds `.`, `..` or a NUL byte, and pack writes only plain relative names"
    )]
    UnsafeName,
    #[error(
        "it is not under any path being restored ({roots}); restore with the spec.backup.paths the backup was taken with"
    )]
    OutsideRoots { roots: String },
    #[error("it is a hard link (to {target}), which pack never writes")]
    Hardlink { target: String },
    #[error("it is a {kind} entry, which pack never writes")]
    Unsupported { kind: String },
    #[error("it is a {kind} entry carrying {size} bytes of data, which pack never writes")]
    CarriesData { kind: &'static str, size: u64 },
    #[error("it is a symlink to {target} and that target {problem}")]
    LinkTarget {
        target: String,
        problem: LinkProblem,
    },
    #[error(
        "{path} in the destination is a symlink and a restore never writes through one; remove it and retry if it should be a directory"
    )]
    SymlinkInPath { path: PathBuf },
    #[error("{path} in the destination is not a directory; move it away and retry")]
    NotADirectory { path: PathBuf },
    #[error("a directory already exists at {path}; move it away and retry")]
    IsADirectory { path: PathBuf },
    #[error("the archive names it twice, which pack never does")]
    Duplicate,
    #[error(
        "it would bring the restored data to {total} bytes, over the limit of {limit} (a decompression bomb, or raise the limit)"
    )]
    TooLarge { total: u64, limit: u64 },
    #[error("its headers take more than {limit} bytes of the archive, which pack never writes")]
    OversizedHeaders { limit: u64 },
    #[error("more than {limit} bytes follow the end of the tar archive, which pack never writes")]
    TrailingData { limit: u64 },
}

/// Why a symlink's target is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkProblem {
    #[error("is empty or holds a NUL byte")]
    Empty,
    #[error("climbs back with `..` after a name (write it without the detour)")]
    Detour,
    #[error("is absolute and outside the backup paths")]
    AbsoluteOutside,
    #[error("leads outside the backup paths")]
    Escapes,
}

/// What was packed, or restored, or would be restored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Regular files and symlinks.
    pub files: u64,
    pub dirs: u64,
    /// Bytes of regular-file content.
    pub bytes: u64,
}

// ---------------------------------------------------------------------------------------------
// Roots and symlink targets, shared by pack and restore.

/// Absolute, lexically normal roots with nested duplicates removed (the outer one covers them),
/// in the order given.
fn normalize_roots(paths: &[PathBuf]) -> Result<Vec<PathBuf>, ArchiveError> {
    let mut normal = Vec::with_capacity(paths.len());
    for path in paths {
        let bad = |problem| ArchiveError::BadPath {
            path: path.clone(),
            problem,
        };
        if !path.is_absolute() {
            return Err(bad("is not absolute"));
        }
        let mut out = PathBuf::from("/");
        for c in path.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(n) => out.push(n),
                Component::ParentDir | Component::Prefix(_) => return Err(bad("contains `..`")),
            }
        }
        if out.as_os_str().as_bytes().contains(&0) {
            return Err(bad("contains a NUL byte"));
        }
        if out == Path::new("/") {
            return Err(bad("is the filesystem root"));
        }
        normal.push(out);
    }
    let kept = normal
        .iter()
        .enumerate()
        .filter(|&(i, p)| {
            !normal.iter().enumerate().any(|(j, q)| {
                j != i && p.starts_with(q) && (p != q || j < i) // covered, or an earlier duplicate
            })
        })
        .map(|(_, p)| p.clone())
        .collect();
    Ok(kept)
}

/// Checks a symlink at `link` (under `link_root`) pointing at `target`; see the module docs.
fn check_link(
    link: &Path,
    link_root: &Path,
    target: &[u8],
    roots: &[PathBuf],
) -> Result<(), LinkProblem> {
    if target.is_empty() || target.contains(&0) {
        return Err(LinkProblem::Empty);
    }
    let target = Path::new(OsStr::from_bytes(target));
    let absolute = target.is_absolute();
    let mut at = if absolute {
        PathBuf::from("/")
    } else {
        link.parent().unwrap_or(Path::new("/")).to_path_buf()
    };
    let mut named = false;
    for c in target.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => {
                named = true;
                at.push(n);
            }
            Component::ParentDir if absolute || named => return Err(LinkProblem::Detour),
            Component::ParentDir => {
                // The directories at or under the root are real ones the restore checked; above
                // the root `..` could go anywhere.
                if !at.starts_with(link_root) || !at.pop() {
                    return Err(LinkProblem::Escapes);
                }
            }
            Component::Prefix(_) => return Err(LinkProblem::Escapes),
        }
    }
    if roots.iter().any(|r| at.starts_with(r)) {
        Ok(())
    } else if absolute {
        Err(LinkProblem::AbsoluteOutside)
    } else {
        Err(LinkProblem::Escapes)
    }
}

// ---------------------------------------------------------------------------------------------
// Packing.

/// Writes a zstd-compressed tar of `paths` (absolute paths; each a file or directory, walked
/// recursively) to `out`. Blocking.
///
/// A path nested in another one is packed once. A root that does not exist is an error; a file
/// or directory below a root that disappears while the walk runs (the agent is live) is skipped.
/// A file that grows while it is read is stored with the size it had when opened; one that
/// shrinks fails the backup.
pub fn pack(paths: &[PathBuf], out: impl Write) -> Result<Summary, ArchiveError> {
    let roots = normalize_roots(paths)?;
    let start = |source| ArchiveError::Write {
        at: "the start of the archive".into(),
        source,
    };
    let mut encoder = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL).map_err(start)?;
    encoder.include_checksum(true).map_err(start)?;
    encoder.window_log(WINDOW_LOG).map_err(start)?;
    let mut builder = tar::Builder::new(encoder);
    let mut summary = Summary::default();
    for root in &roots {
        pack_root(&mut builder, root, &roots, &mut summary)?;
    }
    let end = |source| ArchiveError::Write {
        at: "the end of the archive".into(),
        source,
    };
    let encoder = builder.into_inner().map_err(end)?;
    let mut out = encoder.finish().map_err(end)?;
    out.flush().map_err(end)?;
    Ok(summary)
}

fn pack_root<W: Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    roots: &[PathBuf],
    summary: &mut Summary,
) -> Result<(), ArchiveError> {
    let read_err = |path: &Path, source| ArchiveError::Read {
        path: path.to_path_buf(),
        source,
    };
    let write_err = |path: &Path, source| ArchiveError::Write {
        at: path.display().to_string(),
        source,
    };
    // Below the root, something the agent removed mid-walk is skipped.
    let vanished = |path: &Path, e: &io::Error| path != root && e.kind() == io::ErrorKind::NotFound;

    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if vanished(&path, &e) => continue,
            Err(e) => return Err(read_err(&path, e)),
        };
        let name = path.strip_prefix("/").expect("roots are absolute");
        let kind = meta.file_type();
        if kind.is_dir() {
            let mut header = header(&meta, tar::EntryType::Directory, 0);
            builder
                .append_data(&mut header, name, io::empty())
                .map_err(|e| write_err(&path, e))?;
            summary.dirs += 1;
            let listing = match fs::read_dir(&path) {
                Ok(l) => l,
                Err(e) if vanished(&path, &e) => continue,
                Err(e) => return Err(read_err(&path, e)),
            };
            let mut children = Vec::new();
            for child in listing {
                children.push(child.map_err(|e| read_err(&path, e))?.file_name());
            }
            children.sort();
            stack.extend(children.into_iter().rev().map(|c| path.join(c)));
        } else if kind.is_symlink() {
            let target = match fs::read_link(&path) {
                Ok(t) => t,
                Err(e) if vanished(&path, &e) => continue,
                Err(e) => return Err(read_err(&path, e)),
            };
            check_link(&path, root, target.as_os_str().as_bytes(), roots).map_err(|problem| {
                ArchiveError::UnsafeLink {
                    path: path.clone(),
                    target: target.clone(),
                    problem,
                }
            })?;
            let mut header = header(&meta, tar::EntryType::Symlink, 0);
            builder
                .append_link(&mut header, name, &target)
                .map_err(|e| write_err(&path, e))?;
            summary.files += 1;
        } else if kind.is_file() {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if vanished(&path, &e) => continue,
                Err(e) => return Err(read_err(&path, e)),
            };
            // The opened file's own metadata: the size read below is the one in the header.
            let meta = file.metadata().map_err(|e| read_err(&path, e))?;
            if !meta.is_file() {
                continue;
            }
            let size = meta.len();
            let mut header = header(&meta, tar::EntryType::Regular, size);
            let mut data = FileData {
                file,
                path: &path,
                size,
                remaining: size,
                failure: None,
            };
            if let Err(e) = builder.append_data(&mut header, name, &mut data) {
                return Err(data.failure.take().unwrap_or_else(|| write_err(&path, e)));
            }
            summary.files += 1;
            summary.bytes += size;
        }
        // Sockets, fifos and devices are skipped.
    }
    Ok(())
}

fn header(meta: &fs::Metadata, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(meta.mode() & 0o7777);
    header.set_mtime(u64::try_from(meta.mtime()).unwrap_or(0));
    header.set_uid(u64::from(meta.uid()));
    header.set_gid(u64::from(meta.gid()));
    header
}

/// A file's content, exactly `size` bytes of it, telling read failures apart from write ones.
struct FileData<'a> {
    file: File,
    path: &'a Path,
    size: u64,
    remaining: u64,
    failure: Option<ArchiveError>,
}

impl Read for FileData<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        match self.file.read(&mut buf[..want]) {
            Ok(0) => {
                self.failure = Some(ArchiveError::Changed {
                    path: self.path.to_path_buf(),
                    expected: self.size,
                    read: self.size - self.remaining,
                });
                Err(io::Error::other("the file shrank while it was read"))
            }
            Ok(n) => {
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let kind = e.kind();
                self.failure = Some(ArchiveError::Read {
                    path: self.path.to_path_buf(),
                    source: e,
                });
                Err(io::Error::new(kind, "reading the file failed"))
            }
        }
    }
}

/// The same as [`pack`], as an async byte stream for an HTTP request body.
///
/// `pack` runs on a blocking thread (started at the first poll, so this must be polled inside a
/// Tokio runtime) and hands 64 KiB chunks through a channel of 8, so memory stays constant
/// whatever the size. A failure of `pack` (or a panic) ends the stream with an `io::Error`, so an
/// upload fails rather than ending early looking complete. Dropping the stream stops `pack`.
pub fn pack_stream(paths: Vec<PathBuf>) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    type Task = tokio::task::JoinHandle<Result<Summary, ArchiveError>>;
    enum State {
        Start(Vec<PathBuf>),
        Running(tokio::sync::mpsc::Receiver<Bytes>, Task),
        Done,
    }
    futures::stream::unfold(State::Start(paths), |state| async move {
        let (mut chunks, task) = match state {
            State::Start(paths) => {
                let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
                let task =
                    tokio::task::spawn_blocking(move || pack(&paths, ChannelWriter::new(tx)));
                (rx, task)
            }
            State::Running(chunks, task) => (chunks, task),
            State::Done => return None,
        };
        match chunks.recv().await {
            Some(chunk) => Some((Ok(chunk), State::Running(chunks, task))),
            // The sender is gone: pack returned (or panicked), and says how it went.
            None => match task.await {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some((Err(io::Error::other(e)), State::Done)),
                Err(e) => Some((
                    Err(io::Error::other(format!("packing the backup failed: {e}"))),
                    State::Done,
                )),
            },
        }
    })
}

/// A blocking writer into a bounded channel of chunks.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn new(tx: tokio::sync::mpsc::Sender<Bytes>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(Bytes::from(chunk)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the reader of the backup stream went away",
            )
        })
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

// ---------------------------------------------------------------------------------------------
// Restoring.

/// Runs every check of [`unpack`] on an archive made by [`pack`] without writing anything, and
/// says what a restore would write. Existing symlinks and non-directories in the destination are
/// looked at as `unpack` would.
pub fn check(
    archive: impl Read,
    roots: &[PathBuf],
    max_bytes: u64,
) -> Result<Summary, ArchiveError> {
    restore(archive, roots, max_bytes, false)
}

/// Extracts an archive made by [`pack`] (blocking). Every entry must lie under one of `roots`
/// (the same absolute paths that were packed), and regular-file content may total at most
/// `max_bytes`.
///
/// Entries are processed in archive order, each checked right before it is written; the first
/// refused or failing entry stops the restore, and the error's [`ArchiveError::written`] says how
/// many entries before it were restored. Run [`check`] first so a bad archive writes nothing.
/// Each file is written to a temporary file in its directory, synced, then renamed over the
/// destination. Missing directories are created 0700; directory modes and mtimes are applied at
/// the end (on a directory that already existed and that the sidecar may not change, such as a
/// volume's mount point, they are left as they are). Symlink mtimes, ownership, and setuid,
/// setgid and sticky bits are not restored. An interrupted restore can leave
/// `.agentry-restore-*` temporary files behind; never a half-written file under its own name.
pub fn unpack(
    archive: impl Read,
    roots: &[PathBuf],
    max_bytes: u64,
) -> Result<Summary, ArchiveError> {
    restore(archive, roots, max_bytes, true)
}

fn restore(
    archive: impl Read,
    roots: &[PathBuf],
    max_bytes: u64,
    write: bool,
) -> Result<Summary, ArchiveError> {
    let roots = normalize_roots(roots)?;
    let corrupt_at_start = |source| ArchiveError::Corrupt {
        entry: "the start of the archive".into(),
        written: 0,
        source,
    };
    let mut decoder = zstd::stream::read::Decoder::new(archive).map_err(corrupt_at_start)?;
    decoder
        .window_log_max(WINDOW_LOG)
        .map_err(corrupt_at_start)?;
    let consumed = Rc::new(Cell::new(0));
    let limit = Rc::new(Cell::new(MAX_METADATA));
    let mut tar = tar::Archive::new(Limited {
        inner: decoder,
        consumed: consumed.clone(),
        limit: limit.clone(),
    });
    let mut r = Restorer {
        roots: &roots,
        max_bytes,
        write,
        seen: HashMap::new(),
        parents_ready: HashSet::new(),
        dirs: Vec::new(),
        touched: BTreeSet::new(),
        summary: Summary::default(),
        written: 0,
        temp_seq: 0,
        limit: limit.clone(),
        consumed: consumed.clone(),
        data_end: 0,
    };
    let mut previous: Option<String> = None;
    {
        let mut entries = tar.entries().map_err(corrupt_at_start)?;
        loop {
            // Room for the rest of the previous entry's data and this entry's headers.
            limit.set(r.data_end.max(consumed.get()).saturating_add(MAX_METADATA));
            let entry = match entries.next() {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(e)) => {
                    let at = after(previous.as_deref());
                    return Err(if over_limit(&e) {
                        r.refused(
                            at,
                            Refusal::OversizedHeaders {
                                limit: MAX_METADATA,
                            },
                        )
                    } else {
                        r.corrupt(at, e)
                    });
                }
            };
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            r.entry(entry, &name)?;
            previous = Some(name);
        }
    }
    // Pack always ends the tar with zero blocks; without them the archive was cut short.
    if consumed.get() < r.data_end.saturating_add(BLOCK) {
        let source = io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the tar stream ends without its end-of-archive blocks",
        );
        return Err(r.corrupt(after(previous.as_deref()), source));
    }
    // Read to the end, so the zstd checksum is verified and nothing hides after the tar.
    limit.set(r.data_end.max(consumed.get()).saturating_add(MAX_METADATA));
    let mut rest = tar.into_inner();
    if let Err(e) = io::copy(&mut rest, &mut io::sink()) {
        let at = after(previous.as_deref());
        return Err(if over_limit(&e) {
            r.refused(
                at,
                Refusal::TrailingData {
                    limit: MAX_METADATA,
                },
            )
        } else {
            r.corrupt(at, e)
        });
    }
    r.finish()
}

fn after(previous: Option<&str>) -> String {
    match previous {
        Some(name) => format!("the entry after {name:?}"),
        None => "the first entry".into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
}

struct DirMeta {
    path: PathBuf,
    mode: u32,
    mtime: SystemTime,
    /// Made by this restore (else it existed, perhaps a mount point the sidecar does not own).
    created: bool,
}

struct Restorer<'a> {
    roots: &'a [PathBuf],
    max_bytes: u64,
    write: bool,
    /// Every entry so far: duplicates are refused, and a later entry may not pass through an
    /// earlier symlink or file (which `check` cannot see on disk).
    seen: HashMap<PathBuf, Kind>,
    /// Roots whose parent directory exists (unpack).
    parents_ready: HashSet<PathBuf>,
    /// Directory entries: mode and mtime, applied at the end (unpack).
    dirs: Vec<DirMeta>,
    /// Directories whose entries changed, synced at the end (unpack).
    touched: BTreeSet<PathBuf>,
    summary: Summary,
    written: u64,
    temp_seq: u64,
    limit: Rc<Cell<u64>>,
    consumed: Rc<Cell<u64>>,
    /// Where the current entry's data (padded) ends in the tar stream.
    data_end: u64,
}

impl<'a> Restorer<'a> {
    fn refused(&self, entry: String, reason: Refusal) -> ArchiveError {
        ArchiveError::Refused {
            entry,
            reason,
            written: self.written,
        }
    }

    fn corrupt(&self, entry: String, source: io::Error) -> ArchiveError {
        ArchiveError::Corrupt {
            entry,
            written: self.written,
            source,
        }
    }

    fn failed(&self, entry: &str, path: &Path, source: io::Error) -> ArchiveError {
        ArchiveError::Restore {
            entry: entry.to_string(),
            path: path.to_path_buf(),
            written: self.written,
            source,
        }
    }

    fn entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(), ArchiveError> {
        let (path, root) = self.place(&entry, name)?;
        let kind = self.kind_of(&entry, name)?;
        let header = entry.header();
        let mode = header
            .mode()
            .map_err(|e| self.corrupt(name.to_string(), e))?
            & MODE_MASK;
        let mtime = header
            .mtime()
            .map_err(|e| self.corrupt(name.to_string(), e))?;
        let mtime = UNIX_EPOCH
            .checked_add(Duration::from_secs(mtime))
            .unwrap_or(UNIX_EPOCH);
        let size = entry.size();
        self.check_size(kind, size, name)?;
        let target = match kind {
            Kind::Symlink => Some(self.link_target(&entry, &path, root, name)?),
            _ => None,
        };
        if self.seen.contains_key(&path) {
            return Err(self.refused(name.to_string(), Refusal::Duplicate));
        }
        let missing = self.inspect(&path, root, kind, name)?;
        self.seen.insert(path.clone(), kind);
        // Checked: from here on, the entry is restored (or counted, for check).
        self.consumed_data_limit(size);
        match (kind, target) {
            (Kind::File, _) => {
                if self.write {
                    self.make_parents(root, &missing, name)?;
                    self.write_file(&path, &mut entry, size, mode, mtime, name)?;
                } else {
                    let n = io::copy(&mut entry, &mut io::sink())
                        .map_err(|e| self.corrupt(name.to_string(), e))?;
                    if n != size {
                        return Err(self.corrupt(name.to_string(), truncated(n, size)));
                    }
                }
                self.summary.files += 1;
                self.summary.bytes += size;
            }
            (Kind::Dir, _) => {
                if self.write {
                    self.make_parents(root, &missing, name)?;
                    self.restore_dir(path, mode, mtime, name)?;
                }
                self.summary.dirs += 1;
            }
            (Kind::Symlink, target) => {
                if self.write {
                    self.make_parents(root, &missing, name)?;
                    let target = target.expect("a symlink has a target");
                    self.write_symlink(&path, &target, name)?;
                }
                self.summary.files += 1;
            }
        }
        if self.write {
            self.written += 1;
        }
        Ok(())
    }

    /// The entry's path, and the root it is under; refused when unsafe or under no root.
    fn place<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        name: &str,
    ) -> Result<(PathBuf, &'a PathBuf), ArchiveError> {
        let path = entry_path(&entry.path_bytes())
            .ok_or_else(|| self.refused(name.to_string(), Refusal::UnsafeName))?;
        let Some(root) = self.roots.iter().find(|r| path.starts_with(r)) else {
            let roots = self
                .roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(self.refused(name.to_string(), Refusal::OutsideRoots { roots }));
        };
        Ok((path, root))
    }

    /// What the entry is; hard links and every other kind than file, directory and symlink
    /// are refused.
    fn kind_of<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        name: &str,
    ) -> Result<Kind, ArchiveError> {
        let refuse = |reason| self.refused(name.to_string(), reason);
        match entry.header().entry_type() {
            tar::EntryType::Regular => Ok(Kind::File),
            tar::EntryType::Directory => Ok(Kind::Dir),
            tar::EntryType::Symlink => Ok(Kind::Symlink),
            tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                Err(refuse(Refusal::Hardlink { target }))
            }
            other => Err(refuse(Refusal::Unsupported {
                kind: unsupported_kind(other),
            })),
        }
    }

    /// Files count against the size limit; directories and symlinks carry no data.
    fn check_size(&self, kind: Kind, size: u64, name: &str) -> Result<(), ArchiveError> {
        let refuse = |reason| Err(self.refused(name.to_string(), reason));
        match kind {
            Kind::File => {
                let total = self.summary.bytes.saturating_add(size);
                if total > self.max_bytes {
                    let limit = self.max_bytes;
                    return refuse(Refusal::TooLarge { total, limit });
                }
            }
            Kind::Dir | Kind::Symlink if size != 0 => {
                let kind = if kind == Kind::Dir {
                    "directory"
                } else {
                    "symlink"
                };
                return refuse(Refusal::CarriesData { kind, size });
            }
            _ => {}
        }
        Ok(())
    }

    /// A symlink's target, refused unless it stays within the roots (`check_link`).
    fn link_target<R: Read>(
        &self,
        entry: &tar::Entry<'_, R>,
        path: &Path,
        root: &Path,
        name: &str,
    ) -> Result<OsString, ArchiveError> {
        let target = entry
            .link_name_bytes()
            .map(|t| t.into_owned())
            .unwrap_or_default();
        if let Err(problem) = check_link(path, root, &target, self.roots) {
            let target = String::from_utf8_lossy(&target).into_owned();
            return Err(self.refused(name.to_string(), Refusal::LinkTarget { target, problem }));
        }
        Ok(OsString::from_vec(target))
    }

    /// Creates a directory entry (0700 until `finish` applies its mode and mtime, after its
    /// contents are written).
    fn restore_dir(
        &mut self,
        path: PathBuf,
        mode: u32,
        mtime: SystemTime,
        name: &str,
    ) -> Result<(), ArchiveError> {
        let created = match fs::DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(self.failed(name, &path, e)),
        };
        if created {
            self.touch_parent(&path);
        }
        self.dirs.push(DirMeta {
            path,
            mode,
            mtime,
            created,
        });
        Ok(())
    }

    /// Lets the tar reader take this entry's data (its size was checked against the limit).
    fn consumed_data_limit(&mut self, size: u64) {
        let padded = size.div_ceil(BLOCK).saturating_mul(BLOCK);
        self.data_end = self.consumed.get().saturating_add(padded);
        self.limit.set(self.data_end);
    }

    /// Checks the directories from the root down to `path`'s parent, and `path` itself, in the
    /// destination (and among earlier entries); returns the directories to create.
    fn inspect(
        &self,
        path: &Path,
        root: &Path,
        kind: Kind,
        name: &str,
    ) -> Result<Vec<PathBuf>, ArchiveError> {
        let refuse = |reason| self.refused(name.to_string(), reason);
        let mut ancestors = Vec::new();
        if path != root {
            let mut at = root.to_path_buf();
            ancestors.push(at.clone());
            let below: Vec<_> = path
                .strip_prefix(root)
                .expect("under root")
                .components()
                .collect();
            for c in &below[..below.len() - 1] {
                at.push(c);
                ancestors.push(at.clone());
            }
        }
        let mut missing = Vec::new();
        for dir in ancestors {
            match self.seen.get(&dir) {
                Some(Kind::Dir) => continue,
                Some(Kind::Symlink) => return Err(refuse(Refusal::SymlinkInPath { path: dir })),
                Some(Kind::File) => return Err(refuse(Refusal::NotADirectory { path: dir })),
                None => {}
            }
            if !missing.is_empty() {
                missing.push(dir);
                continue;
            }
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(refuse(Refusal::SymlinkInPath { path: dir }));
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(refuse(Refusal::NotADirectory { path: dir })),
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(dir),
                Err(e) => return Err(self.failed(name, &dir, e)),
            }
        }
        if missing.is_empty() {
            match fs::symlink_metadata(path) {
                Ok(m) => {
                    let existing = m.file_type();
                    match kind {
                        Kind::Dir if existing.is_symlink() => {
                            let path = path.to_path_buf();
                            return Err(refuse(Refusal::SymlinkInPath { path }));
                        }
                        Kind::Dir if !existing.is_dir() => {
                            let path = path.to_path_buf();
                            return Err(refuse(Refusal::NotADirectory { path }));
                        }
                        Kind::File | Kind::Symlink if existing.is_dir() => {
                            let path = path.to_path_buf();
                            return Err(refuse(Refusal::IsADirectory { path }));
                        }
                        _ => {}
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.failed(name, path, e)),
            }
        }
        Ok(missing)
    }

    /// Creates the root's parent if missing, then the checked missing directories (0700).
    fn make_parents(
        &mut self,
        root: &Path,
        missing: &[PathBuf],
        name: &str,
    ) -> Result<(), ArchiveError> {
        if !self.parents_ready.contains(root) {
            if let Some(parent) = root.parent() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(|e| self.failed(name, parent, e))?;
            }
            self.parents_ready.insert(root.to_path_buf());
        }
        for dir in missing {
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => self.touch_parent(dir),
                Err(e) => return Err(self.failed(name, dir, e)),
            }
        }
        Ok(())
    }

    fn touch_parent(&mut self, path: &Path) {
        if let Some(parent) = path.parent().filter(|p| !self.touched.contains(*p)) {
            self.touched.insert(parent.to_path_buf());
        }
    }

    /// A new, exclusive temporary file next to `path`.
    fn temp_path(&mut self, path: &Path) -> PathBuf {
        self.temp_seq += 1;
        path.with_file_name(format!(
            ".agentry-restore-{}-{}",
            std::process::id(),
            self.temp_seq
        ))
    }

    fn write_file(
        &mut self,
        path: &Path,
        data: &mut impl Read,
        size: u64,
        mode: u32,
        mtime: SystemTime,
        name: &str,
    ) -> Result<(), ArchiveError> {
        let (temp, mut file) = loop {
            let temp = self.temp_path(path);
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)
            {
                Ok(file) => break (temp, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(self.failed(name, path, e)),
            }
        };
        let result = (|| {
            let mut buf = vec![0; CHUNK];
            let mut left = size;
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = match data.read(&mut buf[..want]) {
                    Ok(0) => {
                        return Err(self.corrupt(name.to_string(), truncated(size - left, size)));
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(self.corrupt(name.to_string(), e)),
                };
                file.write_all(&buf[..n])
                    .map_err(|e| self.failed(name, path, e))?;
                left -= n as u64;
            }
            let done = || -> io::Result<()> {
                file.set_permissions(fs::Permissions::from_mode(mode))?;
                file.set_modified(mtime)?;
                file.sync_all()?;
                fs::rename(&temp, path)
            };
            done().map_err(|e| self.failed(name, path, e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        } else {
            self.touch_parent(path);
        }
        result
    }

    fn write_symlink(
        &mut self,
        path: &Path,
        target: &OsStr,
        name: &str,
    ) -> Result<(), ArchiveError> {
        let temp = loop {
            let temp = self.temp_path(path);
            match std::os::unix::fs::symlink(target, &temp) {
                Ok(()) => break temp,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(self.failed(name, path, e)),
            }
        };
        if let Err(e) = fs::rename(&temp, path) {
            let _ = fs::remove_file(&temp);
            return Err(self.failed(name, path, e));
        }
        self.touch_parent(path);
        Ok(())
    }

    /// Syncs the changed directories, then applies directory mtimes and modes, deepest first.
    fn finish(mut self) -> Result<Summary, ArchiveError> {
        if !self.write {
            return Ok(self.summary);
        }
        for dir in &self.touched {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.failed("(syncing the restored files)", dir, e))?;
        }
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.path.components().count()));
        for dir in &dirs {
            let applied = File::open(&dir.path)
                .and_then(|d| d.set_modified(dir.mtime))
                .and_then(|()| {
                    fs::set_permissions(&dir.path, fs::Permissions::from_mode(dir.mode))
                });
            match applied {
                Ok(()) => {}
                // A directory that was already there and is not ours (a volume's mount point)
                // keeps its own mode and mtime.
                Err(e) if !dir.created && e.kind() == io::ErrorKind::PermissionDenied => {}
                Err(e) => {
                    let name = dir.path.strip_prefix("/").unwrap_or(&dir.path);
                    return Err(self.failed(&name.display().to_string(), &dir.path, e));
                }
            }
        }
        Ok(self.summary)
    }
}

/// How a refused entry type is named in the error.
fn unsupported_kind(kind: tar::EntryType) -> String {
    match kind {
        tar::EntryType::Char => "character device".to_string(),
        tar::EntryType::Block => "block device".to_string(),
        tar::EntryType::Fifo => "fifo".to_string(),
        tar::EntryType::Continuous => "contiguous file".to_string(),
        tar::EntryType::GNUSparse => "sparse file".to_string(),
        tar::EntryType::XGlobalHeader => "PAX global header".to_string(),
        other => format!("type {:?}", char::from(other.as_byte())),
    }
}

fn truncated(read: u64, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the entry ends after {read} of its {size} bytes"),
    )
}

/// The absolute path an entry name stands for, if the name is plain and relative: components
/// that are neither empty, `.` nor `..`, and no NUL (one trailing `/` is allowed).
fn entry_path(name: &[u8]) -> Option<PathBuf> {
    let name = name.strip_suffix(b"/").unwrap_or(name);
    if name.is_empty() || name.contains(&0) {
        return None;
    }
    let mut path = PathBuf::from("/");
    for c in name.split(|&b| b == b'/') {
        if c.is_empty() || c == b"." || c == b".." {
            return None;
        }
        path.push(OsStr::from_bytes(c));
    }
    Some(path)
}

/// A reader that fails once more than `limit` bytes in all were read from it, so no header (a
/// GNU long name, a PAX record) can make the tar reader buffer without bound.
struct Limited<R> {
    inner: R,
    consumed: Rc<Cell<u64>>,
    limit: Rc<Cell<u64>>,
}

#[derive(Debug)]
struct OverLimit;

impl fmt::Display for OverLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the archive holds more than its headers may take")
    }
}

impl std::error::Error for OverLimit {}

fn over_limit(e: &io::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|e| e as _);
    while let Some(c) = cause {
        if c.is::<OverLimit>() {
            return true;
        }
        cause = c.source();
    }
    false
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let room = self.limit.get().saturating_sub(self.consumed.get());
        if room == 0 {
            // At the limit: fine if the stream ends here.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::other(OverLimit)),
            };
        }
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.consumed.set(self.consumed.get() + n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;

    const GIB: u64 = 1 << 30;

    /// What a tree looks like: path -> (kind, mode, mtime, content or link target).
    type Snapshot = BTreeMap<PathBuf, (&'static str, u32, i64, Vec<u8>)>;

    fn snapshot(roots: &[PathBuf]) -> Snapshot {
        let mut out = Snapshot::new();
        let mut stack: Vec<PathBuf> = roots.to_vec();
        while let Some(path) = stack.pop() {
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let kind = meta.file_type();
            let mode = meta.mode() & 0o7777;
            if kind.is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.insert(path, ("link", 0, 0, target.as_os_str().as_bytes().to_vec()));
            } else if kind.is_dir() {
                for child in fs::read_dir(&path).unwrap() {
                    stack.push(child.unwrap().path());
                }
                out.insert(path, ("dir", mode, meta.mtime(), Vec::new()));
            } else if kind.is_file() {
                out.insert(
                    path.clone(),
                    ("file", mode, meta.mtime(), fs::read(&path).unwrap()),
                );
            }
        }
        out
    }

    fn remove(path: &Path) {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(path).unwrap(),
            Ok(_) => fs::remove_file(path).unwrap(),
            Err(_) => {}
        }
    }

    fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.extend_from_slice(&seed.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn set_mtime(path: &Path, secs: u64) {
        File::open(path)
            .unwrap()
            .set_modified(UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    }

    fn pack_vec(roots: &[PathBuf]) -> (Vec<u8>, Summary) {
        let mut out = Vec::new();
        let summary = pack(roots, &mut out).unwrap();
        (out, summary)
    }

    /// A tree with nested directories, an empty file, a 3 MiB random file, symlinks, modes and
    /// mtimes, a socket (skipped), plus a single-file root and a root that is a symlink.
    fn build_tree(tmp: &Path) -> Vec<PathBuf> {
        let a = tmp.join("a");
        fs::create_dir_all(a.join("nested/deeper/emptydir")).unwrap();
        fs::write(a.join("nested/deeper/file.txt"), b"hello").unwrap();
        fs::set_permissions(
            a.join("nested/deeper/file.txt"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        fs::write(a.join("empty"), b"").unwrap();
        fs::set_permissions(a.join("empty"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(
            a.join("big.bin"),
            random_bytes(3 << 20, 0x9e37_79b9_7f4a_7c15),
        )
        .unwrap();
        fs::set_permissions(a.join("big.bin"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("nested/deeper/file.txt", a.join("link")).unwrap();
        symlink(tmp.join("single.json"), a.join("abs")).unwrap();
        std::os::unix::net::UnixListener::bind(a.join("sock")).unwrap();
        set_mtime(&a.join("nested/deeper/file.txt"), 1_000_000_000);
        fs::set_permissions(a.join("nested"), fs::Permissions::from_mode(0o750)).unwrap();
        set_mtime(&a.join("nested/deeper"), 1_100_000_000);
        let long = a.join("l".repeat(90)).join("o".repeat(90));
        fs::create_dir_all(&long).unwrap();
        fs::write(long.join("n".repeat(90)), b"long").unwrap();
        let target = Path::new(&"o".repeat(90)).join("n".repeat(90));
        symlink(target, a.join("l".repeat(90)).join("k".repeat(90))).unwrap();
        fs::write(tmp.join("single.json"), b"{\"state\":1}").unwrap();
        symlink("a", tmp.join("current")).unwrap();
        vec![a, tmp.join("single.json"), tmp.join("current")]
    }

    #[test]
    fn round_trip_restores_bytes_modes_mtimes_and_links() {
        let tmp = tempfile::tempdir().unwrap();
        let roots = build_tree(tmp.path());
        let mut before = snapshot(&roots);
        before.remove(&tmp.path().join("a/sock"));
        let (archive, packed) = pack_vec(&roots);
        // a, nested, deeper, emptydir, lll, ooo | file.txt, empty, big.bin, link, abs, nnn, kkk,
        // single.json, current
        assert_eq!(
            packed,
            Summary {
                files: 9,
                dirs: 6,
                bytes: 5 + (3 << 20) + 4 + 11
            }
        );

        assert_eq!(check(&archive[..], &roots, GIB).unwrap(), packed);
        for root in &roots {
            remove(root);
        }
        assert_eq!(unpack(&archive[..], &roots, GIB).unwrap(), packed);
        assert_eq!(snapshot(&roots), before);
        assert_eq!(
            fs::read_link(tmp.path().join("a/link")).unwrap(),
            Path::new("nested/deeper/file.txt")
        );

        // Restoring over the live tree replaces it in place.
        fs::write(tmp.path().join("a/empty"), b"changed").unwrap();
        assert_eq!(unpack(&archive[..], &roots, GIB).unwrap(), packed);
        assert_eq!(snapshot(&roots), before);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(tmp.path().join("a")).unwrap().collect();
        assert!(names.iter().all(|n| {
            !n.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("agentry-restore")
        }));
    }

    #[test]
    fn entry_names_are_the_absolute_paths_without_the_slash() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("state.json");
        fs::write(&file, b"x").unwrap();
        let (archive, _) = pack_vec(std::slice::from_ref(&file));
        let tar = zstd::decode_all(&archive[..]).unwrap();
        let mut tar = tar::Archive::new(&tar[..]);
        let names: Vec<_> = tar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().into_owned())
            .collect();
        assert_eq!(names, vec![file.strip_prefix("/").unwrap().to_path_buf()]);
    }

    #[test]
    fn restore_creates_missing_parents_and_nested_roots_pack_once() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("x/y/data");
        fs::create_dir_all(deep.join("sub")).unwrap();
        fs::write(deep.join("sub/f"), b"f").unwrap();
        let roots = vec![deep.join("sub"), deep.clone(), deep.join("sub/f")];
        let before = snapshot(std::slice::from_ref(&deep));
        let (archive, packed) = pack_vec(&roots);
        assert_eq!(
            packed,
            Summary {
                files: 1,
                dirs: 2,
                bytes: 1
            }
        );
        fs::remove_dir_all(tmp.path().join("x")).unwrap();
        unpack(&archive[..], &roots, GIB).unwrap();
        assert_eq!(snapshot(std::slice::from_ref(&deep)), before);
        let parent = fs::metadata(tmp.path().join("x")).unwrap();
        assert_eq!(parent.mode() & 0o777, 0o700);
    }

    #[test]
    fn pack_refuses_paths_and_links_a_restore_would_refuse() {
        let tmp = tempfile::tempdir().unwrap();
        let err = pack(&[PathBuf::from("relative")], Vec::new()).unwrap_err();
        assert!(matches!(err, ArchiveError::BadPath { .. }), "{err}");
        let err = pack(&[PathBuf::from("/")], Vec::new()).unwrap_err();
        assert!(matches!(err, ArchiveError::BadPath { .. }), "{err}");

        let root = tmp.path().join("root");
        fs::create_dir(&root).unwrap();
        symlink("/etc", root.join("etc")).unwrap();
        let err = pack(std::slice::from_ref(&root), Vec::new()).unwrap_err();
        assert!(
            matches!(
                err,
                ArchiveError::UnsafeLink {
                    problem: LinkProblem::AbsoluteOutside,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains(&root.join("etc").display().to_string()),
            "{err}"
        );
        fs::remove_file(root.join("etc")).unwrap();
        symlink("../elsewhere", root.join("up")).unwrap();
        let err = pack(std::slice::from_ref(&root), Vec::new()).unwrap_err();
        assert!(
            matches!(
                err,
                ArchiveError::UnsafeLink {
                    problem: LinkProblem::Escapes,
                    ..
                }
            ),
            "{err}"
        );

        let missing = tmp.path().join("missing");
        let err = pack(std::slice::from_ref(&missing), Vec::new()).unwrap_err();
        assert!(matches!(err, ArchiveError::Read { .. }), "{err}");
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
    }

    #[tokio::test]
    async fn pack_stream_matches_pack_and_fails_loudly() {
        let tmp = tempfile::tempdir().unwrap();
        let roots = build_tree(tmp.path());
        let (expected, _) = pack_vec(&roots);
        let chunks: Vec<_> = pack_stream(roots.clone()).collect().await;
        assert!(chunks.len() > 1);
        let mut streamed = Vec::new();
        for chunk in chunks {
            let chunk = chunk.unwrap();
            assert!(chunk.len() <= CHUNK);
            streamed.extend_from_slice(&chunk);
        }
        assert_eq!(streamed, expected);

        // A missing root: the stream ends with an error, not cleanly.
        let missing = tmp.path().join("missing");
        let items: Vec<_> = pack_stream([roots.clone(), vec![missing.clone()]].concat())
            .collect()
            .await;
        let last = items.last().unwrap();
        let err = last.as_ref().unwrap_err();
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
        assert!(items[..items.len() - 1].iter().all(|i| i.is_ok()));

        // Dropping the stream part way stops pack.
        let mut stream = Box::pin(pack_stream(roots.clone()));
        assert!(stream.next().await.unwrap().is_ok());
        drop(stream);
    }

    // ---- hostile archives -----------------------------------------------------------------

    /// One raw tar entry: name bytes written straight into the header, so `..` and absolute
    /// names get through.
    struct Raw {
        name: Vec<u8>,
        kind: tar::EntryType,
        link: Vec<u8>,
        data: Vec<u8>,
    }

    fn raw(name: impl AsRef<[u8]>, kind: tar::EntryType) -> Raw {
        Raw {
            name: name.as_ref().to_vec(),
            kind,
            link: Vec::new(),
            data: Vec::new(),
        }
    }

    fn link(name: impl AsRef<[u8]>, kind: tar::EntryType, target: &str) -> Raw {
        Raw {
            link: target.as_bytes().to_vec(),
            ..raw(name, kind)
        }
    }

    fn file(name: impl AsRef<[u8]>, data: &[u8]) -> Raw {
        Raw {
            data: data.to_vec(),
            ..raw(name, tar::EntryType::Regular)
        }
    }

    fn hostile(entries: &[Raw]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for e in entries {
            let mut header = tar::Header::new_gnu();
            {
                let old = header.as_old_mut();
                assert!(e.name.len() < old.name.len() && e.link.len() < old.linkname.len());
                old.name[..e.name.len()].copy_from_slice(&e.name);
                old.linkname[..e.link.len()].copy_from_slice(&e.link);
            }
            header.set_entry_type(e.kind);
            header.set_size(e.data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_cksum();
            builder.append(&header, &e.data[..]).unwrap();
        }
        zstd::encode_all(&builder.into_inner().unwrap()[..], ZSTD_LEVEL).unwrap()
    }

    /// A root with one file in it, and a directory beside it that must stay untouched.
    struct Scene {
        tmp: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    impl Scene {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("root");
            let outside = tmp.path().join("outside");
            fs::create_dir(&root).unwrap();
            fs::create_dir(&outside).unwrap();
            fs::write(root.join("keep"), b"keep").unwrap();
            fs::write(outside.join("keep"), b"keep").unwrap();
            Self { tmp, root, outside }
        }

        /// The entry name of a path under the tempdir.
        fn name(&self, rel: &str) -> String {
            let base = self
                .tmp
                .path()
                .strip_prefix("/")
                .unwrap()
                .display()
                .to_string();
            format!("{base}/{rel}")
        }

        fn state(&self) -> Snapshot {
            snapshot(&[self.tmp.path().to_path_buf()])
        }

        /// Both check and unpack refuse the archive, name `entry`, and write nothing.
        fn refuses(&self, archive: &[u8], entry: &str) -> Refusal {
            let roots = vec![self.root.clone()];
            let before = self.state();
            let mut reasons = Vec::new();
            for restore in [check, unpack] {
                let err = restore(archive, &roots, GIB).unwrap_err();
                let ArchiveError::Refused {
                    entry: named,
                    reason,
                    written,
                } = &err
                else {
                    panic!("expected a refusal of {entry}, got {err}");
                };
                assert!(named.contains(entry), "{named} does not name {entry}");
                assert!(err.to_string().contains(entry), "{err}");
                assert_eq!(*written, 0);
                assert_eq!(self.state(), before, "{err} wrote something");
                reasons.push(reason.clone());
            }
            assert_eq!(reasons[0], reasons[1]);
            reasons.remove(0)
        }
    }

    #[test]
    fn refuses_parent_dir_names() {
        let s = Scene::new();
        let name = s.name("root/../outside/pwned");
        let r = s.refuses(&hostile(&[file(&name, b"x")]), &name);
        assert_eq!(r, Refusal::UnsafeName);
        let r = s.refuses(&hostile(&[file("../etc/passwd", b"x")]), "../etc/passwd");
        assert_eq!(r, Refusal::UnsafeName);
    }

    #[test]
    fn refuses_absolute_and_empty_names() {
        let s = Scene::new();
        let name = format!("/{}", s.name("root/abs"));
        assert_eq!(
            s.refuses(&hostile(&[file(&name, b"x")]), &name),
            Refusal::UnsafeName
        );
        let r = s.refuses(&hostile(&[file("", b"x")]), "");
        assert_eq!(r, Refusal::UnsafeName);
        let name = s.name("root/./x");
        let r = s.refuses(&hostile(&[file(&name, b"x")]), &name);
        assert_eq!(r, Refusal::UnsafeName);
        let name = s.name("root//x");
        let r = s.refuses(&hostile(&[file(&name, b"x")]), &name);
        assert_eq!(r, Refusal::UnsafeName);
    }

    #[test]
    fn refuses_entries_outside_the_roots() {
        let s = Scene::new();
        let name = s.name("outside/x");
        let r = s.refuses(&hostile(&[file(&name, b"x")]), &name);
        assert!(matches!(r, Refusal::OutsideRoots { .. }), "{r}");
        // A sibling sharing the root's name as a prefix is outside too.
        let name = s.name("rootling/x");
        let r = s.refuses(&hostile(&[file(&name, b"x")]), &name);
        assert!(matches!(r, Refusal::OutsideRoots { .. }), "{r}");
    }

    #[test]
    fn refuses_hardlinks_devices_and_fifos() {
        let s = Scene::new();
        let name = s.name("root/hl");
        let r = s.refuses(
            &hostile(&[link(&name, tar::EntryType::Link, "etc/passwd")]),
            &name,
        );
        assert!(matches!(r, Refusal::Hardlink { .. }), "{r}");
        for kind in [
            tar::EntryType::Char,
            tar::EntryType::Block,
            tar::EntryType::Fifo,
        ] {
            let name = s.name("root/dev");
            let r = s.refuses(&hostile(&[raw(&name, kind)]), &name);
            assert!(matches!(r, Refusal::Unsupported { .. }), "{r}");
        }
    }

    #[test]
    fn refuses_symlinks_leaving_the_roots() {
        let s = Scene::new();
        let name = s.name("root/etc");
        let r = s.refuses(
            &hostile(&[link(&name, tar::EntryType::Symlink, "/etc")]),
            &name,
        );
        assert!(
            matches!(
                r,
                Refusal::LinkTarget {
                    problem: LinkProblem::AbsoluteOutside,
                    ..
                }
            ),
            "{r}"
        );
        let name = s.name("root/esc");
        let r = s.refuses(
            &hostile(&[link(&name, tar::EntryType::Symlink, "../../outside")]),
            &name,
        );
        assert!(
            matches!(
                r,
                Refusal::LinkTarget {
                    problem: LinkProblem::Escapes,
                    ..
                }
            ),
            "{r}"
        );
        let name = s.name("root/sub/esc");
        let r = s.refuses(
            &hostile(&[link(&name, tar::EntryType::Symlink, "../../outside")]),
            &name,
        );
        assert!(
            matches!(
                r,
                Refusal::LinkTarget {
                    problem: LinkProblem::Escapes,
                    ..
                }
            ),
            "{r}"
        );
        let name = s.name("root/detour");
        let r = s.refuses(
            &hostile(&[link(&name, tar::EntryType::Symlink, "keep/../../outside")]),
            &name,
        );
        assert!(
            matches!(
                r,
                Refusal::LinkTarget {
                    problem: LinkProblem::Detour,
                    ..
                }
            ),
            "{r}"
        );
        let abs_outside = format!("{}/x", s.outside.display());
        let name = s.name("root/abs");
        let r = s.refuses(
            &hostile(&[link(&name, tar::EntryType::Symlink, &abs_outside)]),
            &name,
        );
        assert!(matches!(r, Refusal::LinkTarget { .. }), "{r}");
    }

    #[test]
    fn never_writes_through_an_existing_symlink() {
        let s = Scene::new();
        let elsewhere = s.tmp.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        symlink(&elsewhere, s.root.join("link")).unwrap();
        let name = s.name("root/link/x");
        let r = s.refuses(&hostile(&[file(&name, b"x")]), &name);
        assert_eq!(
            r,
            Refusal::SymlinkInPath {
                path: s.root.join("link")
            }
        );
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
        // Nor a directory entry at the symlink.
        let name = s.name("root/link");
        let r = s.refuses(&hostile(&[raw(&name, tar::EntryType::Directory)]), &name);
        assert_eq!(
            r,
            Refusal::SymlinkInPath {
                path: s.root.join("link")
            }
        );
    }

    #[test]
    fn refuses_entries_through_a_symlink_the_archive_planted() {
        let s = Scene::new();
        let planted = s.name("root/l");
        let through = s.name("root/l/x");
        let archive = hostile(&[
            link(&planted, tar::EntryType::Symlink, "sub"),
            file(&through, b"x"),
        ]);
        let roots = vec![s.root.clone()];
        let before = s.state();
        let err = check(&archive[..], &roots, GIB).unwrap_err();
        assert!(
            matches!(&err, ArchiveError::Refused { entry, reason: Refusal::SymlinkInPath { .. }, written: 0 } if entry.contains(&through)),
            "{err}"
        );
        assert_eq!(s.state(), before);
        let err = unpack(&archive[..], &roots, GIB).unwrap_err();
        assert!(
            matches!(&err, ArchiveError::Refused { entry, reason: Refusal::SymlinkInPath { .. }, .. } if entry.contains(&through)),
            "{err}"
        );
        assert_eq!(err.written(), 1, "{err}");
        assert!(err.to_string().contains("the 1 entries before it"), "{err}");
        assert_eq!(fs::read_link(s.root.join("l")).unwrap(), Path::new("sub"));
        assert!(!s.root.join("sub").exists());
    }

    #[test]
    fn refuses_duplicates_and_type_clashes() {
        let s = Scene::new();
        let name = s.name("root/twice");
        let archive = hostile(&[file(&name, b"1"), file(&name, b"2")]);
        let err = check(&archive[..], std::slice::from_ref(&s.root), GIB).unwrap_err();
        assert!(
            matches!(
                err,
                ArchiveError::Refused {
                    reason: Refusal::Duplicate,
                    ..
                }
            ),
            "{err}"
        );
        // A file where a directory exists, and a directory where a file exists.
        fs::create_dir(s.root.join("dir")).unwrap();
        let name = s.name("root/dir");
        let r = s.refuses(&hostile(&[file(&name, b"x")]), &name);
        assert_eq!(
            r,
            Refusal::IsADirectory {
                path: s.root.join("dir")
            }
        );
        let name = s.name("root/keep/x");
        let r = s.refuses(&hostile(&[file(&name, b"x")]), &name);
        assert_eq!(
            r,
            Refusal::NotADirectory {
                path: s.root.join("keep")
            }
        );
    }

    #[test]
    fn refuses_decompression_bombs() {
        let s = Scene::new();
        let roots = vec![s.root.clone()];
        let name = s.name("root/bomb");
        let archive = hostile(&[file(&name, &vec![0; 2 << 20])]);
        assert!(
            archive.len() < 4096,
            "the bomb compresses to {}",
            archive.len()
        );
        let before = s.state();
        for restore in [check, unpack] {
            let err = restore(&archive[..], &roots, 1 << 20).unwrap_err();
            assert!(
                matches!(&err, ArchiveError::Refused { entry, reason: Refusal::TooLarge { total, limit: 1_048_576 }, .. } if entry.contains(&name) && *total == 2 << 20),
                "{err}"
            );
            assert_eq!(s.state(), before);
        }
        // Within the limit it restores.
        assert_eq!(check(&archive[..], &roots, 2 << 20).unwrap().bytes, 2 << 20);

        // A GNU long name of 2 MiB would be buffered whole by the tar reader.
        let longname = Raw {
            data: vec![b'a'; 2 << 20],
            ..raw("././@LongLink", tar::EntryType::GNULongName)
        };
        let archive = hostile(&[longname, file(s.name("root/x"), b"x")]);
        for restore in [check, unpack] {
            let err = restore(&archive[..], &roots, GIB).unwrap_err();
            assert!(
                matches!(
                    &err,
                    ArchiveError::Refused {
                        reason: Refusal::OversizedHeaders { .. },
                        ..
                    }
                ),
                "{err}"
            );
            assert_eq!(s.state(), before);
        }
    }

    #[test]
    fn corrupt_and_truncated_archives_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let roots = build_tree(tmp.path());
        let (archive, _) = pack_vec(&roots);
        let cut = &archive[..archive.len() / 2];
        let err = check(cut, &roots, GIB).unwrap_err();
        assert!(matches!(err, ArchiveError::Corrupt { .. }), "{err}");
        let mut flipped = archive.clone();
        let at = flipped.len() - 100;
        flipped[at] ^= 0xff;
        assert!(check(&flipped[..], &roots, GIB).is_err());
        // Trailing garbage after the frame.
        let mut trailing = archive.clone();
        trailing.extend_from_slice(b"garbage");
        assert!(check(&trailing[..], &roots, GIB).is_err());
        let err = check(&b"not zstd at all"[..], &roots, GIB).unwrap_err();
        assert!(matches!(err, ArchiveError::Corrupt { .. }), "{err}");
        // Empty input, and a tar cut at an entry boundary in a well-formed zstd frame.
        let err = check(&b""[..], &roots, GIB).unwrap_err();
        assert!(matches!(err, ArchiveError::Corrupt { .. }), "{err}");
        let tar = zstd::decode_all(&archive[..]).unwrap();
        let cut = zstd::encode_all(&tar[..tar.len() - 1024], ZSTD_LEVEL).unwrap();
        let err = check(&cut[..], &roots, GIB).unwrap_err();
        assert!(matches!(err, ArchiveError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("end-of-archive"), "{err}");
    }

    #[test]
    fn unpack_error_counts_what_was_written() {
        let s = Scene::new();
        let good = s.name("root/good");
        let bad = s.name("root/bad");
        let archive = hostile(&[
            file(&good, b"good"),
            link(&bad, tar::EntryType::Symlink, "/etc"),
        ]);
        let roots = vec![s.root.clone()];
        let before = s.state();
        let err = check(&archive[..], &roots, GIB).unwrap_err();
        assert_eq!(err.written(), 0);
        assert_eq!(s.state(), before, "check wrote something");
        let err = unpack(&archive[..], &roots, GIB).unwrap_err();
        assert_eq!(err.written(), 1, "{err}");
        assert_eq!(fs::read(s.root.join("good")).unwrap(), b"good");
        assert!(fs::symlink_metadata(s.root.join("bad")).is_err());
    }

    #[test]
    fn symlinks_between_roots_are_accepted() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        symlink("../b/x", a.join("rel")).unwrap();
        symlink(b.join("x"), a.join("abs")).unwrap();
        let roots = vec![a.clone(), b.clone()];
        let (archive, _) = pack_vec(&roots);
        let before = snapshot(&roots);
        remove(&a);
        remove(&b);
        unpack(&archive[..], &roots, GIB).unwrap();
        assert_eq!(snapshot(&roots), before);
        // Restored with only root a, the link into b is refused.
        let err = check(&archive[..], std::slice::from_ref(&a), GIB).unwrap_err();
        assert!(matches!(err, ArchiveError::Refused { .. }), "{err}");
    }

    // ---- random trees ---------------------------------------------------------------------

    #[derive(Debug, Clone)]
    enum Node {
        File(Vec<u8>, u32),
        Dir(u32),
        Link(usize),
    }

    fn tree() -> impl Strategy<Value = Vec<(Vec<u8>, Node)>> {
        let name = prop::collection::vec(prop::sample::select(vec![b'a', b'b', b'c']), 1..4);
        let node = prop_oneof![
            (
                prop::collection::vec(any::<u8>(), 0..3000),
                prop::sample::select(vec![0o600u32, 0o644, 0o755, 0o400])
            )
                .prop_map(|(data, mode)| Node::File(data, mode)),
            prop::sample::select(vec![0o700u32, 0o750, 0o755]).prop_map(Node::Dir),
            (0usize..8).prop_map(Node::Link),
        ];
        prop::collection::vec((name, node), 0..24)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn random_trees_round_trip(spec in tree()) {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("root");
            fs::create_dir(&root).unwrap();
            let mut made: Vec<PathBuf> = vec![root.clone()];
            for (name, node) in spec {
                // Each node goes into one of the directories made so far.
                let dirs: Vec<_> = made.iter().filter(|p| fs::symlink_metadata(p).unwrap().is_dir()).cloned().collect();
                let parent = &dirs[name.len() % dirs.len()];
                let path = parent.join(OsStr::from_bytes(&name));
                if fs::symlink_metadata(&path).is_ok() {
                    continue;
                }
                match node {
                    Node::File(data, mode) => {
                        fs::write(&path, &data).unwrap();
                        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
                    }
                    Node::Dir(mode) => {
                        fs::create_dir(&path).unwrap();
                        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
                    }
                    Node::Link(to) => {
                        let target = made[to % made.len()].strip_prefix(&root).unwrap().to_path_buf();
                        symlink(root.join(target), &path).unwrap();
                    }
                }
                made.push(path);
            }
            let roots = vec![root.clone()];
            let before = snapshot(&roots);
            let (archive, packed) = pack_vec(&roots);
            prop_assert_eq!(check(&archive[..], &roots, GIB).unwrap(), packed.clone());
            fs::remove_dir_all(&root).unwrap();
            prop_assert_eq!(unpack(&archive[..], &roots, GIB).unwrap(), packed);
            prop_assert_eq!(snapshot(&roots), before);
        }
    }
}
