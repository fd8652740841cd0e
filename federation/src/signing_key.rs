//! The server's ed25519 signing key, stored as `ed25519 <version> <base64 PKCS#8 DER>`.

use std::{fs, io, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD_NO_PAD};
use ruma::signatures::Ed25519KeyPair;

#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("signing key file: {0}")]
    Io(#[from] io::Error),
    #[error("signing key file is malformed: {0}")]
    Malformed(String),
}

/// The key pair that signs this server's events and federation requests.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("key_id", &self.key_id()).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Loads the key from `path`, or generates one there (mode 0600) if the file does not exist.
    pub fn load_or_generate(path: &Path) -> Result<Self, SigningKeyError> {
        match fs::read_to_string(path) {
            Ok(text) => Self::parse(&text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let der = Ed25519KeyPair::generate();
                let version: String = STANDARD_NO_PAD
                    .encode(&der[der.len().saturating_sub(4)..])
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .take(6)
                    .collect();
                let text = format!("ed25519 a_{version} {}\n", STANDARD_NO_PAD.encode(&der));
                if let Some(dir) = path.parent() {
                    fs::create_dir_all(dir)?;
                }
                let mut options = fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                io::Write::write_all(&mut options.open(path)?, text.as_bytes())?;
                Self::parse(&text)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn parse(text: &str) -> Result<Self, SigningKeyError> {
        let mut parts = text.split_whitespace();
        let (Some("ed25519"), Some(version), Some(der), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SigningKeyError::Malformed("expected `ed25519 <version> <key>`".to_owned()));
        };
        let der = STANDARD_NO_PAD
            .decode(der.trim_end_matches('='))
            .map_err(|e| SigningKeyError::Malformed(e.to_string()))?;
        let pair = Ed25519KeyPair::from_der(&der, version.to_owned())
            .map_err(|e| SigningKeyError::Malformed(e.to_string()))?;
        Ok(Self { pair })
    }

    /// `ed25519:<version>`, the id other servers know the key by.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.pair.version())
    }

    /// The public key, unpadded base64 as the spec publishes it.
    pub fn public_key_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.pair.public_key())
    }

    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.pair
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_loaded() {
        let dir = std::env::temp_dir().join(format!("hearth-key-{}", std::process::id()));
        let path = dir.join("signing.key");
        let _ = fs::remove_file(&path);
        let first = SigningKey::load_or_generate(&path).unwrap();
        let again = SigningKey::load_or_generate(&path).unwrap();
        assert_eq!(first.key_id(), again.key_id());
        assert_eq!(first.public_key_base64(), again.public_key_base64());
        assert_eq!(first.public_key_base64().len(), 43);
        fs::write(&path, "rsa 1 abc").unwrap();
        assert!(SigningKey::load_or_generate(&path).is_err());
        let _ = fs::remove_dir_all(dir);
    }
}
