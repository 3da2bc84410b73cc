//! The peercam rendezvous server: authenticated registration of cameras, lookups and
//! introductions for viewers. It never sees video and holds no key that could impersonate
//! a camera or a viewer.
//!
//! Library + thin binary: [`server::start`] takes a [`server::Config`] and returns a
//! [`server::Handle`]; `main.rs` only parses flags and the config file ([`config`]).

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod cluster;
pub mod config;
pub mod registry;
pub mod relay;
pub mod server;

pub use server::{start, Config, Handle, Limits};
