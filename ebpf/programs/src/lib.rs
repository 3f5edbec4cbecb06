//! Empty library so the agent can list this crate as a build-dependency (for rebuilds); the
//! programs themselves are the `weft` binary, built for `bpfel-unknown-none` by aya-build.
#![no_std]
