//! Kiln: a continuous-integration build coordinator for Nix flakes.
//!
//! Data flows one way: trigger → fetch → eval → queue → builder → cache →
//! notify, with the database (`db`) underneath; `deploy` takes green
//! evaluations' closures from there to hosts. `nix` holds Nix's formats,
//! `config` the configuration, `serve` wires the long-running server
//! together and `web` its HTTP side.

pub mod build;
pub mod builder;
pub mod cache;
pub mod config;
pub mod db;
pub mod deploy;
pub mod eval;
pub mod events;
pub mod fetch;
pub mod forge;
pub mod gcroots;
pub mod github;
pub mod history;
pub mod logs;
pub mod metrics;
pub mod nix;
pub mod products;
pub mod queue;
pub mod repo_config;
pub mod serve;
pub mod trigger;
pub mod upstream;
pub mod web;
