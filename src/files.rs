//! Source file paths from requests. A path is resolved (`..` and symlinks) before it is
//! checked against the allowed roots, and resolved again when the file is served, so a
//! request can never reach a file outside the configured roots.

use std::path::{Path, PathBuf};

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
}

/// Resolves `raw` and returns its canonical form when it is a regular file inside one of
/// `roots` (which must themselves be canonical).
pub fn resolve_within_roots(raw: &str, roots: &[PathBuf]) -> Result<PathBuf, PathRejection> {
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
    if !resolved.is_file() {
        return Err(PathRejection::NotAFile);
    }
    Ok(resolved)
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

    #[test]
    fn only_files_inside_roots_pass() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("sub/a.mp3"), b"x").unwrap();
        std::fs::write(outside.join("secret"), b"x").unwrap();
        let roots = vec![std::fs::canonicalize(&root).unwrap()];
        let inside = root.join("sub/a.mp3");
        assert_eq!(
            resolve_within_roots(inside.to_str().unwrap(), &roots),
            Ok(std::fs::canonicalize(&inside).unwrap())
        );

        let escape = format!("{}/sub/../../outside/secret", root.display());
        assert_eq!(
            resolve_within_roots(&escape, &roots),
            Err(PathRejection::OutsideRoots)
        );
        std::os::unix::fs::symlink(outside.join("secret"), root.join("link")).unwrap();
        assert_eq!(
            resolve_within_roots(root.join("link").to_str().unwrap(), &roots),
            Err(PathRejection::OutsideRoots)
        );
        assert_eq!(
            resolve_within_roots("relative/a.mp3", &roots),
            Err(PathRejection::NotAbsolute)
        );
        assert_eq!(
            resolve_within_roots(root.join("nope").to_str().unwrap(), &roots),
            Err(PathRejection::Missing)
        );
        assert_eq!(
            resolve_within_roots(root.join("sub").to_str().unwrap(), &roots),
            Err(PathRejection::NotAFile)
        );
        // A sibling directory whose name starts like the root is not inside it.
        std::fs::create_dir_all(dir.path().join("root2")).unwrap();
        std::fs::write(dir.path().join("root2/f"), b"x").unwrap();
        assert_eq!(
            resolve_within_roots(dir.path().join("root2/f").to_str().unwrap(), &roots),
            Err(PathRejection::OutsideRoots)
        );
    }

    #[test]
    fn download_names_are_safe() {
        assert_eq!(download_name(Path::new("/x/my file\".mp3")), "my_file_.mp3");
        assert_eq!(download_name(Path::new("/")), "source");
    }
}
