//! Shared test support: the fake Relace upstream, a raw HTTP/1.1 client, builders
//! that run the real gateway (in-process on port 0, or as the real binary), and
//! assertions on the gateway's own answers.
#![allow(dead_code, unused_imports)]

pub mod assertions;
pub mod certs;
pub mod fake_relace;
pub mod gateway;
pub mod raw;
pub mod readings;
pub mod redis;
pub mod tls_upstream;

pub use assertions::*;
pub use certs::{client_config_trusting, Ca};
pub use fake_relace::{pattern_sha256, FakeRelace, Recorded, ACCOUNT_KEY};
pub use gateway::*;
pub use raw::{body_text, call, call_with_auth, post_json, sha_hex, RawResponse};
pub use readings::{decode, remove_dot_segments};
pub use tls_upstream::{server_config, tls_upstream};
