//! sdp-proto
