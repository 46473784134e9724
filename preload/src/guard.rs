//! The guard lives in `ops` (the progress thread needs it too); the hooks use it from here.

pub use ops::guard::{switch, switch_call};
