//! The only form in which a token is kept: its SHA-256 digest.

use std::fmt;

use sha2::{Digest as _, Sha256};

/// The SHA-256 digest of a token. Its `Debug` and `Display` print only the 12-hex `id`,
/// so a digest can be logged without thought and a token can never be.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenDigest([u8; 32]);

/// Length of the public token id in hex digits (SPEC §7).
pub const TOKEN_ID_LEN: usize = 12;

impl TokenDigest {
    /// Hashes a token. The caller drops the token afterwards; only this value lives on.
    pub fn of(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The public identifier: the first 12 hex digits of the digest.
    pub fn id(&self) -> TokenId {
        let mut id = [0u8; TOKEN_ID_LEN];
        hex_into(&self.0[..TOKEN_ID_LEN / 2], &mut id);
        TokenId(id)
    }

    /// The whole digest in lower-case hex.
    pub fn to_hex(&self) -> String {
        let mut out = [0u8; 64];
        hex_into(&self.0, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

impl fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenDigest({})", self.id())
    }
}

impl fmt::Display for TokenDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.id(), f)
    }
}

/// A token's public id (12 lower-case hex digits), stack-allocated.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenId([u8; TOKEN_ID_LEN]);

impl TokenId {
    pub fn as_str(&self) -> &str {
        // Only ever built from ASCII hex digits.
        std::str::from_utf8(&self.0).unwrap_or("")
    }

    /// Parses a user-supplied id (any case).
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != TOKEN_ID_LEN || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut id = [0u8; TOKEN_ID_LEN];
        for (dst, src) in id.iter_mut().zip(s.bytes()) {
            *dst = src.to_ascii_lowercase();
        }
        Some(Self(id))
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_digest_prefix_and_debug_hides_the_token() {
        let token = "rlcr-0123456789abcdef0123";
        let d = TokenDigest::of(token);
        assert_eq!(d.id().as_str(), &d.to_hex()[..12]);
        let shown = format!("{d:?} {d}");
        assert!(!shown.contains(token));
        assert_eq!(
            TokenId::parse(&d.to_hex()[..12].to_uppercase()),
            Some(d.id())
        );
        assert_eq!(TokenId::parse("xyz"), None);
    }
}
