//! Placeholder until the end-to-end harness lands.
