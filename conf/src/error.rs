//! Errors of parsing and loading a policy file.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// One mistake in a policy file, located at the token that is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The file name as given to [`crate::Policy::parse`].
    pub source: String,
    /// 1-based line number.
    pub line: u32,
    /// 1-based column (in characters) of the first character of the offending token, or one past
    /// the end of the line when something is missing.
    pub column: u32,
    /// What the grammar wanted at that place, e.g. `sdp, tcp or both`.
    pub expected: String,
    /// What was there instead: a quoted token such as `"sdpp"`, or `end of line`.
    pub found: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: expected {}, found {}",
            self.source, self.line, self.column, self.expected, self.found
        )
    }
}

impl std::error::Error for ParseError {}

/// Every mistake of a file, in file order. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseErrors(pub Vec<ParseError>);

impl fmt::Display for ParseErrors {
    /// One line per error, no trailing newline.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseErrors {}

/// Why [`crate::Policy::load`] gave no policy.
#[derive(Debug)]
pub enum LoadError {
    /// The file could not be read.
    Io { path: PathBuf, error: io::Error },
    /// The file was read and has mistakes.
    Parse(ParseErrors),
}

impl LoadError {
    /// True when the file does not exist, the one I/O outcome that is not an error for the
    /// library (it means "no policy file": `both` everywhere).
    pub fn is_not_found(&self) -> bool {
        matches!(self, LoadError::Io { error, .. } if error.kind() == io::ErrorKind::NotFound)
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            LoadError::Parse(errors) => write!(f, "{errors}"),
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Io { error, .. } => Some(error),
            LoadError::Parse(errors) => Some(errors),
        }
    }
}

impl From<ParseErrors> for LoadError {
    fn from(e: ParseErrors) -> Self {
        LoadError::Parse(e)
    }
}
