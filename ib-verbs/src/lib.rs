//! ib-verbs
