//! What every stage's settings share: the error that names a key and says
//! why, and the checks more than one stage makes. Each stage owns its
//! settings (`source::settings`, `sink::settings`, ...); the `config`
//! module gathers them into one file.

/// A setting that cannot be used: its key (`database.batch_rows`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct Invalid {
    pub key: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// True for `[a-z_][a-z0-9_]*` up to 40 bytes: safe to splice into SQL.
pub fn valid_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 40
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A lower-case identifier, or empty when `optional`.
///
/// # Errors
/// [`Invalid`] for `key` otherwise.
pub fn identifier(key: &str, name: &str, optional: bool) -> Result<(), Invalid> {
    if (optional && name.is_empty()) || valid_identifier(name) {
        return Ok(());
    }
    Err(Invalid::new(
        key,
        if optional {
            "must be a lower-case identifier or empty"
        } else {
            "must be a lower-case SQL identifier ([a-z_][a-z0-9_]*, at most 40 characters)"
        },
    ))
}

/// A file named by a setting must be readable when given.
///
/// # Errors
/// [`Invalid`] for `key` when `path` is set and cannot be read.
pub fn readable(key: &str, path: &str) -> Result<(), Invalid> {
    if !path.is_empty() && std::fs::metadata(path).is_err() {
        return Err(Invalid::new(key, format!("cannot read {path}")));
    }
    Ok(())
}
