//! peercam end-to-end tests: one binary, one file per area.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod access;
mod cli;
mod cluster;
mod identity;
mod live;
mod load;
mod nat;
mod operations;
mod recovery;
mod relay;
mod security;
mod sources;
mod streaming;
mod tunlink;
mod window;
