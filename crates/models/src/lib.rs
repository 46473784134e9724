//! Only tests live here (tests/loom_*.rs); see docs/SANITIZERS.md.
