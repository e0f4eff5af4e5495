//! Source files named by requests, reached only through directory handles.
//!
//! A path checked by name and then opened again by name is a race: a directory on it can be
//! swapped for a symlink in between. So every access opens the root directory first and
//! resolves the rest of the path beneath that handle, following no symlinks at all (Linux
//! `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`; elsewhere, or on kernels without
//! `openat2`, one `openat` per component with `O_NOFOLLOW`). Stored paths are canonical, so
//! a symlink found on one later was swapped in after the job was created, and is refused.
//!
//! Files are opened non-blocking (a FIFO swapped in cannot block the opening thread) and
//! checked on the opened handle: only a regular file is served. Deletion stats and unlinks
//! the name relative to its parent directory's handle. Every function here does blocking
//! system calls: async callers run them on `spawn_blocking`.
//!
//! The roots are opened for each access, not once at startup, so a root that is mounted,
//! or replaced by a new directory, after the server started is used as it is now; the root
//! path itself (canonical at startup) must still contain no symlink.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathRejection {
    #[error("source_file_path must be an absolute path")]
    NotAbsolute,
    #[error("source_file_path does not exist or is not readable")]
    Missing,
    #[error("source_file_path is not a regular file")]
    NotAFile,
    #[error("source_file_path is outside the allowed roots")]
    OutsideRoots,
    #[error("source_file_path has more than one hard link, which this server refuses")]
    HardLinked,
}

/// Whether files with more than one hard link are served (`MORAG_REMOTE_REFUSE_HARDLINKS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardLinks {
    Allow,
    Refuse,
}

/// A regular file opened beneath an allowed root.
#[derive(Debug)]
pub struct OpenedSource {
    pub file: File,
    pub len: u64,
}

/// Creation-time check: resolves `raw` (`..` and symlinks) and returns its canonical form
/// when it is a regular file inside one of `roots` (which must themselves be canonical).
/// Resolving by name gives the request a clear reason; the file is then opened beneath its
/// root to check what it is on the handle.
pub fn resolve_within_roots(
    raw: &str,
    roots: &[PathBuf],
    hard_links: HardLinks,
) -> Result<PathBuf, PathRejection> {
    if raw.contains('\0') {
        return Err(PathRejection::Missing);
    }
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(PathRejection::NotAbsolute);
    }
    let resolved = std::fs::canonicalize(path).map_err(|_| PathRejection::Missing)?;
    if !roots.iter().any(|root| resolved.starts_with(root)) {
        return Err(PathRejection::OutsideRoots);
    }
    open_within_roots(&resolved, roots, hard_links)?;
    Ok(resolved)
}

/// Opens `path` (canonical, as stored) for reading beneath the widest root that contains
/// it, refusing any symlink on the way and anything but a regular file.
pub fn open_within_roots(
    path: &Path,
    roots: &[PathBuf],
    hard_links: HardLinks,
) -> Result<OpenedSource, PathRejection> {
    // A symlink-free resolution beneath a root stays beneath every root that contains it,
    // so the widest containing root is the one that accepts the most.
    let (root, relative) = roots
        .iter()
        .filter_map(|root| Some((root, path.strip_prefix(root).ok()?)))
        .min_by_key(|(root, _)| root.as_os_str().len())
        .ok_or(PathRejection::OutsideRoots)?;
    let relative = normal_relative(relative).ok_or(PathRejection::OutsideRoots)?;
    let root_handle = open_root(root).map_err(rejection_for_open)?;
    let fd = open_beneath(
        root_handle.as_fd(),
        &relative,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
    )
    .map_err(rejection_for_open)?;
    let stat = rustix::fs::fstat(&fd).map_err(|_| PathRejection::Missing)?;
    if !FileType::from_raw_mode(stat.st_mode).is_file() {
        return Err(PathRejection::NotAFile);
    }
    if hard_links == HardLinks::Refuse && stat.st_nlink > 1 {
        return Err(PathRejection::HardLinked);
    }
    // Regular files ignore O_NONBLOCK, so the handle reads like any other.
    Ok(OpenedSource {
        file: File::from(fd),
        len: u64::try_from(stat.st_size).unwrap_or(0),
    })
}

/// What `remove_beneath` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// Nothing by that name: already gone.
    Missing,
    /// Not removed: outside `root`, a symlink on the way, or not a regular file.
    Refused,
}

/// Deletes `path` if it is a regular file beneath `root` reached without symlinks. The
/// name is checked and unlinked relative to its parent directory's handle, so a directory
/// swapped for a symlink cannot redirect the deletion outside `root`.
pub fn remove_beneath(root: &Path, path: &Path) -> io::Result<Removal> {
    let Some(relative) = path.strip_prefix(root).ok().and_then(normal_relative) else {
        return Ok(Removal::Refused);
    };
    let (Some(name), Some(parent)) = (relative.file_name(), relative.parent()) else {
        return Ok(Removal::Refused);
    };
    let root_handle = open_root(root)?;
    let parent_handle = if parent.as_os_str().is_empty() {
        root_handle
    } else {
        match open_beneath(root_handle.as_fd(), parent, OFlags::DIRECTORY | path_only()) {
            Ok(handle) => handle,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Removal::Missing),
            Err(error) if is_refusal(&error) => return Ok(Removal::Refused),
            Err(error) => return Err(error),
        }
    };
    let stat = match rustix::fs::statat(&parent_handle, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::NOENT) => return Ok(Removal::Missing),
        Err(error) => return Err(error.into()),
    };
    if !FileType::from_raw_mode(stat.st_mode).is_file() {
        return Ok(Removal::Refused);
    }
    // If the name is swapped between the stat and the unlink, the unlink still acts only
    // on this directory's entry: a symlink put there is removed itself, never its target,
    // and a directory is not unlinked (EISDIR).
    match rustix::fs::unlinkat(&parent_handle, name, AtFlags::empty()) {
        Ok(()) => Ok(Removal::Removed),
        Err(Errno::NOENT) => Ok(Removal::Missing),
        Err(Errno::ISDIR) => Ok(Removal::Refused),
        Err(error) => Err(error.into()),
    }
}

/// `relative` as plain names only: no `..`, no root, no `.`; None when it has a `..` or
/// names nothing.
fn normal_relative(relative: &Path) -> Option<PathBuf> {
    let mut clean = PathBuf::new();
    for component in relative.components() {
        match component {
            Component::Normal(name) => clean.push(name),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!clean.as_os_str().is_empty()).then_some(clean)
}

/// Errors that mean "a symlink or an escape was in the way", as opposed to a missing file.
fn is_refusal(error: &io::Error) -> bool {
    let errno = Errno::from_io_error(error);
    matches!(errno, Some(Errno::LOOP | Errno::XDEV | Errno::NOTDIR))
}

fn rejection_for_open(error: io::Error) -> PathRejection {
    if is_refusal(&error) {
        PathRejection::OutsideRoots
    } else {
        PathRejection::Missing
    }
}

/// Opens the root directory by its absolute path, refusing any symlink on it.
fn open_root(root: &Path) -> io::Result<OwnedFd> {
    let relative = root.strip_prefix("/").map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a root must be an absolute path",
        )
    })?;
    let filesystem_root = rustix::fs::open("/", OFlags::DIRECTORY | path_only(), Mode::empty())?;
    if relative.as_os_str().is_empty() {
        return Ok(filesystem_root);
    }
    open_beneath(
        filesystem_root.as_fd(),
        relative,
        OFlags::DIRECTORY | path_only(),
    )
}

/// Opens `relative` beneath `dir` following no symlink and never leaving `dir`.
/// `relative` must consist of plain names (see `normal_relative`).
fn open_beneath(dir: BorrowedFd<'_>, relative: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::ResolveFlags;
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        // EAGAIN: the kernel saw a concurrent rename and could not prove the walk stayed
        // beneath; retrying is what the man page suggests. Bounded, so an attacker renaming
        // in a loop gets a refusal rather than a spinning thread.
        for _ in 0..8 {
            match rustix::fs::openat2(
                dir,
                relative,
                flags | OFlags::CLOEXEC,
                Mode::empty(),
                resolve,
            ) {
                Ok(fd) => return Ok(fd),
                Err(Errno::AGAIN) => continue,
                // Kernels before 5.6 (or a seccomp filter that does not know openat2).
                Err(Errno::NOSYS) => return open_beneath_by_components(dir, relative, flags),
                Err(error) => return Err(error.into()),
            }
        }
        Err(Errno::AGAIN.into())
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        open_beneath_by_components(dir, relative, flags)
    }
}

/// The portable walk: each directory is opened with `O_NOFOLLOW` relative to the previous
/// one, so no symlink is followed and `..` never appears (callers pass plain names).
fn open_beneath_by_components(
    dir: BorrowedFd<'_>,
    relative: &Path,
    flags: OFlags,
) -> io::Result<OwnedFd> {
    let mut names = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(name) => names.push(name),
            Component::CurDir => {}
            _ => return Err(Errno::XDEV.into()),
        }
    }
    let Some((last, directories)) = names.split_last() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"));
    };
    let mut current: Option<OwnedFd> = None;
    for name in directories {
        let at = current.as_ref().map_or(dir, |fd| fd.as_fd());
        let next = rustix::fs::openat(
            at,
            *name,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC | path_only(),
            Mode::empty(),
        )?;
        current = Some(next);
    }
    let at = current.as_ref().map_or(dir, |fd| fd.as_fd());
    Ok(rustix::fs::openat(
        at,
        *last,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Directories are opened only to resolve names beneath them: `O_PATH` where it exists
/// needs no read permission on them.
fn path_only() -> OFlags {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        OFlags::PATH
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        OFlags::RDONLY
    }
}

/// The file name for `Content-Disposition`, reduced to characters that need no quoting.
pub fn download_name(path: &Path) -> String {
    let name: String = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "source".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    struct Tree {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        roots: Vec<PathBuf>,
    }

    /// `root/sub/a.mp3` ("inside") and `outside/secret` ("secret"), both canonical.
    fn tree() -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let root = base.join("root");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("sub/a.mp3"), b"inside").unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        Tree {
            _dir: dir,
            roots: vec![root.clone()],
            root,
            outside,
        }
    }

    fn read_all(mut opened: OpenedSource) -> Vec<u8> {
        let mut bytes = Vec::new();
        opened.file.read_to_end(&mut bytes).unwrap();
        assert_eq!(opened.len, bytes.len() as u64);
        bytes
    }

    #[test]
    fn only_files_inside_roots_pass_creation() {
        let t = tree();
        let inside = t.root.join("sub/a.mp3");
        assert_eq!(
            resolve_within_roots(inside.to_str().unwrap(), &t.roots, HardLinks::Allow),
            Ok(inside.clone())
        );
        let escape = format!("{}/sub/../../outside/secret", t.root.display());
        assert_eq!(
            resolve_within_roots(&escape, &t.roots, HardLinks::Allow),
            Err(PathRejection::OutsideRoots)
        );
        std::os::unix::fs::symlink(t.outside.join("secret"), t.root.join("link")).unwrap();
        assert_eq!(
            resolve_within_roots(
                t.root.join("link").to_str().unwrap(),
                &t.roots,
                HardLinks::Allow
            ),
            Err(PathRejection::OutsideRoots)
        );
        // A symlink that stays inside is resolved and stored as its target.
        std::os::unix::fs::symlink(&inside, t.root.join("inner-link")).unwrap();
        assert_eq!(
            resolve_within_roots(
                t.root.join("inner-link").to_str().unwrap(),
                &t.roots,
                HardLinks::Allow
            ),
            Ok(inside)
        );
        assert_eq!(
            resolve_within_roots("relative/a.mp3", &t.roots, HardLinks::Allow),
            Err(PathRejection::NotAbsolute)
        );
        assert_eq!(
            resolve_within_roots(
                t.root.join("nope").to_str().unwrap(),
                &t.roots,
                HardLinks::Allow
            ),
            Err(PathRejection::Missing)
        );
        assert_eq!(
            resolve_within_roots(
                t.root.join("sub").to_str().unwrap(),
                &t.roots,
                HardLinks::Allow
            ),
            Err(PathRejection::NotAFile)
        );
        // A sibling directory whose name starts like the root is not inside it.
        let sibling = t.root.with_file_name("root2");
        std::fs::create_dir_all(&sibling).unwrap();
        std::fs::write(sibling.join("f"), b"x").unwrap();
        assert_eq!(
            resolve_within_roots(
                sibling.join("f").to_str().unwrap(),
                &t.roots,
                HardLinks::Allow
            ),
            Err(PathRejection::OutsideRoots)
        );
    }

    #[test]
    fn opening_serves_a_regular_file_beneath_its_root() {
        let t = tree();
        let opened = open_within_roots(&t.root.join("sub/a.mp3"), &t.roots, HardLinks::Allow);
        assert_eq!(read_all(opened.unwrap()), b"inside");
        // The widest root is used when roots nest.
        let nested = vec![t.root.join("sub"), t.root.clone()];
        let opened = open_within_roots(&t.root.join("sub/a.mp3"), &nested, HardLinks::Allow);
        assert_eq!(read_all(opened.unwrap()), b"inside");
    }

    #[test]
    fn opening_refuses_a_directory_swapped_for_a_symlink_out() {
        let t = tree();
        // The stored path was `root/sub/secret`; `sub` is now a link to the outside.
        std::fs::rename(t.root.join("sub"), t.root.join("old-sub")).unwrap();
        std::os::unix::fs::symlink(&t.outside, t.root.join("sub")).unwrap();
        assert_eq!(
            open_within_roots(&t.root.join("sub/secret"), &t.roots, HardLinks::Allow).unwrap_err(),
            PathRejection::OutsideRoots
        );
    }

    #[test]
    fn opening_refuses_absolute_and_relative_symlinks_even_inside() {
        let t = tree();
        std::os::unix::fs::symlink(t.outside.join("secret"), t.root.join("absolute")).unwrap();
        std::os::unix::fs::symlink("../outside/secret", t.root.join("relative")).unwrap();
        std::os::unix::fs::symlink("sub/a.mp3", t.root.join("inner")).unwrap();
        for name in ["absolute", "relative", "inner"] {
            assert_eq!(
                open_within_roots(&t.root.join(name), &t.roots, HardLinks::Allow).unwrap_err(),
                PathRejection::OutsideRoots,
                "{name}"
            );
        }
    }

    #[test]
    fn opening_refuses_dot_dot_and_paths_outside_every_root() {
        let t = tree();
        let escape = t.root.join("sub/../../outside/secret");
        assert_eq!(
            open_within_roots(&escape, &t.roots, HardLinks::Allow).unwrap_err(),
            PathRejection::OutsideRoots
        );
        assert_eq!(
            open_within_roots(&t.outside.join("secret"), &t.roots, HardLinks::Allow).unwrap_err(),
            PathRejection::OutsideRoots
        );
        assert_eq!(
            open_within_roots(&t.root, &t.roots, HardLinks::Allow).unwrap_err(),
            PathRejection::OutsideRoots,
            "the root itself names no file"
        );
    }

    #[test]
    fn opening_a_fifo_or_a_directory_is_refused_without_blocking() {
        let t = tree();
        let fifo = t.root.join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // Without O_NONBLOCK this open would wait for a writer forever.
        assert_eq!(
            open_within_roots(&fifo, &t.roots, HardLinks::Allow).unwrap_err(),
            PathRejection::NotAFile
        );
        assert_eq!(
            open_within_roots(&t.root.join("sub"), &t.roots, HardLinks::Allow).unwrap_err(),
            PathRejection::NotAFile
        );
        assert_eq!(
            resolve_within_roots(fifo.to_str().unwrap(), &t.roots, HardLinks::Allow),
            Err(PathRejection::NotAFile)
        );
    }

    #[test]
    fn hard_links_are_refused_only_when_asked() {
        let t = tree();
        let link = t.root.join("hard");
        std::fs::hard_link(t.outside.join("secret"), &link).unwrap();
        assert_eq!(
            open_within_roots(&link, &t.roots, HardLinks::Refuse).unwrap_err(),
            PathRejection::HardLinked
        );
        assert_eq!(
            resolve_within_roots(link.to_str().unwrap(), &t.roots, HardLinks::Refuse),
            Err(PathRejection::HardLinked)
        );
        // Allowed by default: the file roots cannot tell a hard link from the original.
        let opened = open_within_roots(&link, &t.roots, HardLinks::Allow).unwrap();
        assert_eq!(read_all(opened), b"secret");
        // A file with one link passes when refusing.
        let opened = open_within_roots(&t.root.join("sub/a.mp3"), &t.roots, HardLinks::Refuse);
        assert_eq!(read_all(opened.unwrap()), b"inside");
    }

    #[test]
    fn the_component_walk_follows_no_symlink() {
        let t = tree();
        let root = std::fs::File::open(&t.root).unwrap();
        let fd = open_beneath_by_components(root.as_fd(), Path::new("sub/a.mp3"), OFlags::RDONLY)
            .unwrap();
        let mut bytes = Vec::new();
        File::from(fd).read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes, b"inside");
        std::os::unix::fs::symlink(&t.outside, t.root.join("out")).unwrap();
        std::os::unix::fs::symlink(t.outside.join("secret"), t.root.join("leaf")).unwrap();
        for relative in ["out/secret", "leaf", "../outside/secret"] {
            let error =
                open_beneath_by_components(root.as_fd(), Path::new(relative), OFlags::RDONLY)
                    .unwrap_err();
            assert!(is_refusal(&error), "{relative}: {error}");
        }
    }

    #[test]
    fn removal_unlinks_only_regular_files_reached_without_symlinks() {
        let t = tree();
        std::fs::write(t.outside.join("victim"), b"keep").unwrap();
        std::fs::write(t.root.join("sub/victim"), b"delete").unwrap();
        assert_eq!(
            remove_beneath(&t.root, &t.root.join("sub/victim")).unwrap(),
            Removal::Removed
        );
        assert!(!t.root.join("sub/victim").exists());
        assert_eq!(
            remove_beneath(&t.root, &t.root.join("sub/victim")).unwrap(),
            Removal::Missing
        );
        // A directory swapped for a symlink to the outside: nothing outside is touched.
        std::fs::rename(t.root.join("sub"), t.root.join("old-sub")).unwrap();
        std::os::unix::fs::symlink(&t.outside, t.root.join("sub")).unwrap();
        assert_eq!(
            remove_beneath(&t.root, &t.root.join("sub/victim")).unwrap(),
            Removal::Refused
        );
        // A final symlink is refused too, and neither it nor its target goes.
        std::os::unix::fs::symlink(t.outside.join("victim"), t.root.join("leaf")).unwrap();
        assert_eq!(
            remove_beneath(&t.root, &t.root.join("leaf")).unwrap(),
            Removal::Refused
        );
        assert!(t.root.join("leaf").symlink_metadata().is_ok());
        assert_eq!(std::fs::read(t.outside.join("victim")).unwrap(), b"keep");
        // Directories, `..` and paths outside the root are refused.
        assert_eq!(
            remove_beneath(&t.root, &t.root.join("old-sub")).unwrap(),
            Removal::Refused
        );
        assert_eq!(
            remove_beneath(&t.root, &t.root.join("old-sub/../../outside/victim")).unwrap(),
            Removal::Refused
        );
        assert_eq!(
            remove_beneath(&t.root, &t.outside.join("victim")).unwrap(),
            Removal::Refused
        );
        assert_eq!(std::fs::read(t.outside.join("victim")).unwrap(), b"keep");
    }

    #[test]
    fn download_names_are_safe() {
        assert_eq!(download_name(Path::new("/x/my file\".mp3")), "my_file_.mp3");
        assert_eq!(download_name(Path::new("/")), "source");
    }
}
