//! Enrollment tokens.
//!
//! A token is `outpost1.` + base64url(postcard([`TokenClaims`])) + `.` +
//! base64url(HMAC-SHA256 of those claim bytes under the hub's enrollment
//! key). The device reads the claims without the key (where the hub is, and
//! the fingerprint of the CA to pin on first contact); only the hub, which
//! holds the key, can check the tag. Use counts are kept by the hub.

use crate::identity::Fingerprint;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "outpost1.";

/// What a token says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenClaims {
    /// Random id; the hub counts redemptions under it.
    pub id: [u8; 16],
    /// Where the hub's QUIC endpoint is (`host:port`).
    pub hub: String,
    /// Fingerprint of the fleet CA certificate.
    pub ca: Fingerprint,
    /// End of validity, seconds since the Unix epoch.
    pub expires_at: u64,
    /// How many devices may enroll with it.
    pub uses: u32,
}

/// A token read from text, its tag not yet checked.
#[derive(Debug, Clone)]
pub struct ParsedToken {
    /// The claims as decoded.
    pub claims: TokenClaims,
    claim_bytes: Vec<u8>,
    tag: Vec<u8>,
}

/// Why text is not a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Not of the form `outpost1.<claims>.<tag>`.
    #[error("not an Outpost enrollment token (expected outpost1.<claims>.<tag>)")]
    Format,
    /// The claims do not decode.
    #[error("enrollment token is damaged: {0}")]
    Claims(#[source] postcard::Error),
}

/// Makes a token for `claims`, tagged with `key`.
pub fn issue(claims: &TokenClaims, key: &[u8]) -> String {
    // Plain data; serialization into a Vec cannot fail.
    let bytes = postcard::to_stdvec(claims).unwrap_or_default();
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), &bytes);
    format!("{PREFIX}{}.{}", URL_SAFE_NO_PAD.encode(&bytes), URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

/// Reads a token's claims without checking its tag.
pub fn parse(text: &str) -> Result<ParsedToken, TokenError> {
    let rest = text.trim().strip_prefix(PREFIX).ok_or(TokenError::Format)?;
    let (claims_b64, tag_b64) = rest.split_once('.').ok_or(TokenError::Format)?;
    let claim_bytes = URL_SAFE_NO_PAD.decode(claims_b64).map_err(|_| TokenError::Format)?;
    let tag = URL_SAFE_NO_PAD.decode(tag_b64).map_err(|_| TokenError::Format)?;
    let claims = postcard::from_bytes(&claim_bytes).map_err(TokenError::Claims)?;
    Ok(ParsedToken { claims, claim_bytes, tag })
}

impl ParsedToken {
    /// True if the tag was made with `key` (constant-time comparison).
    pub fn verify(&self, key: &[u8]) -> bool {
        let key = hmac::Key::new(hmac::HMAC_SHA256, key);
        hmac::verify(&key, &self.claim_bytes, &self.tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> TokenClaims {
        TokenClaims {
            id: [7; 16],
            hub: "127.0.0.1:7443".into(),
            ca: Fingerprint([9; 32]),
            expires_at: 1_900_000_000,
            uses: 3,
        }
    }

    #[test]
    fn round_trip_and_verification() {
        let text = issue(&claims(), b"key one");
        let parsed = parse(&text).unwrap();
        assert_eq!(parsed.claims, claims());
        assert!(parsed.verify(b"key one"));
        assert!(!parsed.verify(b"key two"));
    }

    #[test]
    fn tampered_claims_fail_verification() {
        let text = issue(&claims(), b"k");
        let mut other = claims();
        other.uses = 1000;
        let forged_claims = issue(&other, b"attacker");
        // Graft the attacker's claims onto the genuine tag.
        let genuine_tag = text.rsplit_once('.').unwrap().1;
        let forged_body = forged_claims.rsplit_once('.').unwrap().0;
        let forged = parse(&format!("{forged_body}.{genuine_tag}")).unwrap();
        assert!(!forged.verify(b"k"));
    }

    #[test]
    fn garbage_is_not_a_token() {
        for bad in ["", "outpost1.", "outpost1.abc", "hello.a.b", "outpost1.!!!.AAAA"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
