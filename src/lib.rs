//! Test-suite helpers shared by `tests/` and `benches/`.
