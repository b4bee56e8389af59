//! Shared test support: the fake Relace upstream, a raw HTTP/1.1 client, and builders
//! that run the real gateway (in-process on port 0, or as the real binary).
#![allow(dead_code, unused_imports)]

pub mod fake_relace;
pub mod gateway;
pub mod raw;

pub use fake_relace::{pattern_sha256, FakeRelace, Recorded, ACCOUNT_KEY};
pub use gateway::*;
pub use raw::{call, sha_hex, RawResponse};
