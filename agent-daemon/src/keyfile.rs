//! The backup key file: 64 hex digits an operator keeps (mode 0600). Read by
//! the backup commands and checked by the config's environment check before
//! the daemon starts. A leaf module, so that check does not depend on the
//! backup module (which depends on the config).

use std::path::{Path, PathBuf};

/// Why the backup key cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The key file is not 32 bytes in hex.
    #[error(
        "[backups] key_file {0}: expected 64 hex digits (32 bytes); make one with `head -c 32 /dev/urandom | xxd -p -c 64`"
    )]
    BadKey(PathBuf),
    /// The key file cannot be read.
    #[error("[backups] key_file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Reads the operator's backup key: 64 hex digits (whitespace ignored).
pub fn read_key(path: &Path) -> Result<[u8; 32], KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read { path: path.to_owned(), source })?;
    let hex: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    outpost_shared::identity::parse_hex32(&hex).ok_or_else(|| KeyFileError::BadKey(path.to_owned()))
}
