//! libsdp.so
