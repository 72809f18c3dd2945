//! Signed bundles: who made a bundle, and that nothing in it changed since.
//!
//! The manifest's `graph_sha256` sits in the same file as the graph: it
//! catches accidents (a truncated copy, a flipped bit), not an attacker,
//! who edits the weights and recomputes it. An ed25519 signature does. It
//! is made over
//!
//! ```text
//! "tern-bundle-signature-v1\n" ‖ sha256(graph) ‖ sha256(rest)
//! ```
//!
//! where `graph` is the `graph` field's bytes as stored (its sha256 is the
//! manifest's `graph_sha256`) and `rest` is every other top-level field of
//! the `ModelProto` as stored (tag, length and value, in file order) except
//! the signature entry itself: the manifest entry, IR version, opsets,
//! producer, any other metadata. Any change to the file outside the
//! signature entry breaks the signature; signing again replaces the entry.
//!
//! # The signature entry
//!
//! `metadata_props` key [`SIGNATURE_KEY`] (`tern.signature`), a JSON
//! [`Signature`] of at most [`MAX_SIGNATURE_BYTES`]:
//!
//! ```text
//! {"algorithm":"ed25519","key_id":"<16 hex>","public_key":"<64 hex>","signature":"<128 hex>"}
//! ```
//!
//! [`verify`] never trusts the public key the entry names: it looks for a
//! trusted key with the same bytes ([`FormatError::UnknownSigner`] if there
//! is none) and checks the signature with that key (`verify_strict`, which
//! refuses malleable signatures and weak keys). Without a signature entry:
//! [`FormatError::Unsigned`].
//!
//! # Key files
//!
//! One line of text each; the public key may carry a comment (who or what
//! the key is for), shown when a bundle signed by it is verified:
//!
//! ```text
//! tern-ed25519-secret-v1 <64 hex: the 32-byte secret seed>
//! tern-ed25519-public-v1 <64 hex: the 32-byte public key> [comment]
//! ```
//!
//! A key's id is the first 16 hex digits of the sha256 of its 32 public
//! bytes. Secret key files are written with mode 0600 and never over an
//! existing file.

use std::path::Path;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::bundle::Bundle;
use crate::error::FormatError;
use crate::files::{hex, write_atomic, write_new, write_new_private};
use crate::onnx;

/// The `metadata_props` key that holds the signature.
pub const SIGNATURE_KEY: &str = "tern.signature";
/// Largest signature entry accepted (bytes of JSON).
pub const MAX_SIGNATURE_BYTES: usize = 4096;
/// The one signature algorithm.
pub const ALGORITHM: &str = "ed25519";
/// First line word of a secret key file.
pub const SECRET_KEY_TAG: &str = "tern-ed25519-secret-v1";
/// First line word of a public key file.
pub const PUBLIC_KEY_TAG: &str = "tern-ed25519-public-v1";
/// Largest key file read.
const MAX_KEY_FILE_BYTES: u64 = 4096;
/// Domain separation: a Tern bundle signature is valid for nothing else.
const DOMAIN: &[u8] = b"tern-bundle-signature-v1\n";

/// The signature entry of a bundle, as stored (hex strings). Parsed when
/// the bundle is read, checked only by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// [`ALGORITHM`].
    pub algorithm: String,
    /// The signer's key id (see [`PublicKey::key_id`]).
    pub key_id: String,
    /// The signer's public key, 64 hex digits. Only a claim: [`verify`]
    /// accepts it only if a trusted key has the same bytes.
    pub public_key: String,
    /// The ed25519 signature, 128 hex digits.
    pub signature: String,
}

impl Signature {
    /// Parses the JSON of a signature entry.
    pub(crate) fn from_json(json: &str) -> Result<Signature, FormatError> {
        serde_json::from_str(json)
            .map_err(|e| FormatError::Invalid { what: format!("`{SIGNATURE_KEY}` entry"), detail: e.to_string() })
    }

    /// The public key the entry names (not a trusted key).
    pub fn claimed_key(&self) -> Result<PublicKey, FormatError> {
        let invalid = |detail: String| FormatError::Invalid { what: format!("`{SIGNATURE_KEY}` entry"), detail };
        if self.algorithm != ALGORITHM {
            return Err(invalid(format!("algorithm `{}`; this build checks {ALGORITHM} only", self.algorithm)));
        }
        let bytes = from_hex::<32>(&self.public_key)
            .ok_or_else(|| invalid("public_key is not 64 hex digits".into()))?;
        let key = PublicKey::from_bytes(&bytes).map_err(|_| invalid("public_key is not an ed25519 key".into()))?;
        if key.key_id() != self.key_id {
            return Err(invalid(format!("key_id {} is not the id of its public key ({})", self.key_id, key.key_id())));
        }
        Ok(key)
    }
}

/// A signing key. Its bytes are wiped from memory when it is dropped.
pub struct SecretKey {
    key: SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey(public key {})", self.public_key().key_id())
    }
}

impl SecretKey {
    /// A new key from the operating system's random number generator.
    pub fn generate() -> Result<SecretKey, FormatError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut())
            .map_err(|e| FormatError::Invalid { what: "system randomness".into(), detail: e.to_string() })?;
        Ok(SecretKey::from_seed(&seed))
    }

    /// The key of a 32-byte secret seed (for tests and key files).
    pub fn from_seed(seed: &[u8; 32]) -> SecretKey {
        SecretKey { key: SigningKey::from_bytes(seed) }
    }

    /// The matching public key, without a comment.
    pub fn public_key(&self) -> PublicKey {
        PublicKey { key: self.key.verifying_key(), comment: String::new() }
    }

    /// The key file's text (one line).
    pub fn to_text(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{SECRET_KEY_TAG} {}\n", hex(self.key.as_bytes())))
    }

    /// Parses a key file's text.
    pub fn from_text(text: &str) -> Result<SecretKey, FormatError> {
        let invalid = |detail: &str| FormatError::Invalid { what: "secret key".into(), detail: detail.into() };
        let mut words = text.split_whitespace();
        match words.next() {
            Some(SECRET_KEY_TAG) => {}
            Some(PUBLIC_KEY_TAG) => return Err(invalid("this is a public key; signing needs the secret key file")),
            _ => return Err(invalid(&format!("expected a line `{SECRET_KEY_TAG} <64 hex digits>`"))),
        }
        let seed = words
            .next()
            .and_then(|w| from_hex::<32>(w).map(Zeroizing::new))
            .ok_or_else(|| invalid("the key is not 64 hex digits"))?;
        Ok(SecretKey::from_seed(&seed))
    }

    /// Reads a secret key file.
    pub fn read(path: &Path) -> Result<SecretKey, FormatError> {
        let text = read_key_file(path)?;
        SecretKey::from_text(&text).map_err(|e| in_file(path, e))
    }

    /// Writes the key to a new file readable by its owner only (0600),
    /// atomically; fails if `path` exists.
    pub fn write_new(&self, path: &Path) -> Result<(), FormatError> {
        write_new_private(path, self.to_text().as_bytes())
    }

    /// Signs `bundle`: the file's bytes with its signature entry replaced by
    /// one of this key (every other byte as it was).
    pub fn sign(&self, bundle: &Bundle) -> Result<Vec<u8>, FormatError> {
        let public = self.public_key();
        let signature = self.key.sign(&message(bundle));
        let entry = Signature {
            algorithm: ALGORITHM.into(),
            key_id: public.key_id(),
            public_key: hex(public.as_bytes()),
            signature: hex(&signature.to_bytes()),
        };
        // A ModelProto with only this entry encodes to exactly the one
        // `metadata_props` field, ready to append.
        let field = onnx::ModelProto {
            metadata_props: vec![onnx::StringStringEntryProto {
                key: Some(SIGNATURE_KEY.into()),
                value: Some(serde_json::to_string(&entry)?),
            }],
            ..Default::default()
        };
        let mut bytes = bundle.without_signature()?;
        prost::Message::encode(&field, &mut bytes)
            .map_err(|e| FormatError::Malformed { detail: format!("cannot encode the signature: {e}") })?;
        Ok(bytes)
    }
}

/// A public key that checks signatures, with the comment of its key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    comment: String,
}

impl PublicKey {
    /// The key of 32 public bytes; fails if they are not a point of the curve.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<PublicKey, FormatError> {
        let key = VerifyingKey::from_bytes(bytes)
            .map_err(|e| FormatError::Invalid { what: "public key".into(), detail: e.to_string() })?;
        Ok(PublicKey { key, comment: String::new() })
    }

    /// The 32 public bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.key.as_bytes()
    }

    /// The first 16 hex digits of the sha256 of the public bytes.
    pub fn key_id(&self) -> String {
        let mut id = hex(&Sha256::digest(self.as_bytes()));
        id.truncate(16);
        id
    }

    /// The key file's comment (empty if none).
    pub fn comment(&self) -> &str {
        &self.comment
    }

    /// This key with `comment` (one line; white space runs become one space).
    pub fn with_comment(self, comment: &str) -> PublicKey {
        PublicKey { comment: comment.split_whitespace().collect::<Vec<_>>().join(" "), ..self }
    }

    /// The key file's text (one line).
    pub fn to_text(&self) -> String {
        let comment = if self.comment.is_empty() { String::new() } else { format!(" {}", self.comment) };
        format!("{PUBLIC_KEY_TAG} {}{comment}\n", hex(self.as_bytes()))
    }

    /// Parses a key file's text.
    pub fn from_text(text: &str) -> Result<PublicKey, FormatError> {
        let invalid = |detail: &str| FormatError::Invalid { what: "public key".into(), detail: detail.into() };
        let line = text.trim();
        let mut words = line.splitn(3, char::is_whitespace);
        match words.next() {
            Some(PUBLIC_KEY_TAG) => {}
            Some(SECRET_KEY_TAG) => {
                return Err(invalid("this is a secret key; give the public key file (KEY.pub) instead"))
            }
            _ => return Err(invalid(&format!("expected a line `{PUBLIC_KEY_TAG} <64 hex digits> [comment]`"))),
        }
        let bytes = words.next().and_then(from_hex::<32>).ok_or_else(|| invalid("the key is not 64 hex digits"))?;
        Ok(PublicKey::from_bytes(&bytes)?.with_comment(words.next().unwrap_or("")))
    }

    /// Reads a public key file.
    pub fn read(path: &Path) -> Result<PublicKey, FormatError> {
        let text = read_key_file(path)?;
        PublicKey::from_text(&text).map_err(|e| in_file(path, e))
    }

    /// Writes the key to a new file, atomically; fails if `path` exists.
    pub fn write_new(&self, path: &Path) -> Result<(), FormatError> {
        write_new(path, self.to_text().as_bytes())
    }

    /// `key id` or `key id (comment)`.
    pub fn describe(&self) -> String {
        if self.comment.is_empty() {
            self.key_id()
        } else {
            format!("{} ({})", self.key_id(), self.comment)
        }
    }
}

/// What a bundle's signature signs (see the module docs).
pub fn message(bundle: &Bundle) -> Vec<u8> {
    let d = bundle.digests();
    [DOMAIN, &d.graph[..], &d.rest[..]].concat()
}

/// Checks `bundle`'s signature against the `trusted` keys and returns the
/// one that signed it. Errors: [`FormatError::Unsigned`] without a
/// signature, [`FormatError::UnknownSigner`] when no trusted key has the
/// signer's bytes, [`FormatError::BadSignature`] when the bundle changed
/// after it was signed, [`FormatError::Invalid`] for a malformed entry.
pub fn verify<'k>(bundle: &Bundle, trusted: &'k [PublicKey]) -> Result<&'k PublicKey, FormatError> {
    let entry = bundle.signature().ok_or(FormatError::Unsigned)?;
    let claimed = entry.claimed_key()?;
    let key = trusted
        .iter()
        .find(|k| k.as_bytes() == claimed.as_bytes())
        .ok_or_else(|| FormatError::UnknownSigner { key_id: claimed.key_id() })?;
    check(bundle, entry, key)?;
    Ok(key)
}

/// Checks `bundle`'s signature against the public key its own entry names,
/// and returns that key. This shows the bundle is intact since that key
/// signed it, not who holds the key: use [`verify`] with trusted keys for that.
pub fn verify_claimed(bundle: &Bundle) -> Result<PublicKey, FormatError> {
    let entry = bundle.signature().ok_or(FormatError::Unsigned)?;
    let claimed = entry.claimed_key()?;
    check(bundle, entry, &claimed)?;
    Ok(claimed)
}

fn check(bundle: &Bundle, entry: &Signature, key: &PublicKey) -> Result<(), FormatError> {
    let bad = || FormatError::BadSignature { key_id: key.key_id() };
    let bytes = from_hex::<64>(&entry.signature).ok_or_else(bad)?;
    let signature = ed25519_dalek::Signature::from_bytes(&bytes);
    key.key.verify_strict(&message(bundle), &signature).map_err(|_| bad())
}

/// Signs the bundle at `path` with `key`, in place and atomically (an
/// existing signature is replaced), after checking the signed file reads
/// back and verifies. Returns the signed bundle.
pub fn sign_file(path: &Path, key: &SecretKey) -> Result<Bundle, FormatError> {
    let bundle = Bundle::read(path)?;
    let signed = Bundle::from_bytes(key.sign(&bundle)?)?;
    verify(&signed, &[key.public_key()])?;
    write_atomic(path, &signed.onnx)?;
    Ok(signed)
}

fn read_key_file(path: &Path) -> Result<Zeroizing<String>, FormatError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| FormatError::io(path, e))?;
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_KEY_FILE_BYTES + 1).read_to_string(&mut text).map_err(|e| FormatError::io(path, e))?;
    if text.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(FormatError::TooLarge {
            what: format!("key file {}", path.display()),
            size: text.len() as u64,
            limit: MAX_KEY_FILE_BYTES,
        });
    }
    Ok(text)
}

/// Names the file in a key parsing error.
fn in_file(path: &Path, e: FormatError) -> FormatError {
    match e {
        FormatError::Invalid { what, detail } => FormatError::Invalid { what: format!("{what} {}", path.display()), detail },
        e => e,
    }
}

/// `N` bytes from exactly `2N` hex digits (either case).
fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip() {
        let secret = SecretKey::from_seed(&[7; 32]);
        let back = SecretKey::from_text(&secret.to_text()).unwrap();
        assert_eq!(back.public_key(), secret.public_key());
        let public = secret.public_key().with_comment("  release\t2025 ");
        let text = public.to_text();
        assert!(text.starts_with("tern-ed25519-public-v1 ") && text.ends_with(" release 2025\n"), "{text}");
        let back = PublicKey::from_text(&text).unwrap();
        assert_eq!(back, public);
        assert_eq!(back.comment(), "release 2025");
        assert_eq!(back.key_id().len(), 16);
    }

    #[test]
    fn key_files_are_not_mixed_up() {
        let secret = SecretKey::from_seed(&[7; 32]);
        let e = PublicKey::from_text(&secret.to_text()).unwrap_err();
        assert!(e.to_string().contains("secret key"), "{e}");
        let e = SecretKey::from_text(&secret.public_key().to_text()).unwrap_err();
        assert!(e.to_string().contains("public key"), "{e}");
        for bad in ["", "tern-ed25519-public-v1", "tern-ed25519-public-v1 abcd", "ssh-ed25519 AAAA"] {
            assert!(PublicKey::from_text(bad).is_err(), "{bad:?} accepted");
        }
        let odd = format!("{PUBLIC_KEY_TAG} {}", "zz".repeat(32));
        assert!(PublicKey::from_text(&odd).is_err());
    }

    #[test]
    fn hex_is_exact() {
        assert_eq!(from_hex::<2>("0aFf"), Some([0x0a, 0xff]));
        assert_eq!(from_hex::<2>("0aF"), None);
        assert_eq!(from_hex::<2>("0aFfe"), None);
        assert_eq!(from_hex::<1>("+1"), None);
        assert_eq!(from_hex::<1>("é"), None);
    }
}
