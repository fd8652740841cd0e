//! Server key documents (`GET /_matrix/key/v2/server`): this server's, signed, and other
//! servers', checked. Pure functions: fetching and caching are the server's.

use std::collections::BTreeMap;

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, ServerName,
    api::federation::discovery::{OldVerifyKey, VerifyKey},
    signatures::{PublicKeyMap, PublicKeySet},
};

use crate::signing_key::SigningKey;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the key document is malformed: {0}")]
    Malformed(String),
    #[error("the key document is for {found}, not {expected}")]
    WrongServer { expected: String, found: String },
    #[error("the key document is not signed by the keys it lists: {0}")]
    BadSignature(String),
}

/// A key this server signed with before, published so that what it signed then can still be
/// checked.
#[derive(Debug, Clone)]
pub struct OldKey {
    /// `ed25519:<version>`.
    pub key_id: String,
    /// Unpadded base64.
    pub public_key: String,
    /// When it stopped being used, in ms.
    pub expired_ts: u64,
}

/// This server's key document, signed with its key.
pub fn own_key_document(
    server_name: &ServerName,
    key: &SigningKey,
    old_keys: &[OldKey],
    valid_until_ts: u64,
) -> Result<CanonicalJsonObject, KeyError> {
    let mut verify_keys = CanonicalJsonObject::new();
    verify_keys.insert(key.key_id(), key_object(&key.public_key_base64()));
    let mut old = CanonicalJsonObject::new();
    for old_key in old_keys {
        let mut object = key_object(&old_key.public_key);
        if let CanonicalJsonValue::Object(fields) = &mut object {
            fields.insert("expired_ts".into(), int(old_key.expired_ts)?);
        }
        old.insert(old_key.key_id.clone(), object);
    }
    let mut document = CanonicalJsonObject::from([
        ("server_name".to_owned(), server_name.as_str().into()),
        ("verify_keys".to_owned(), verify_keys.into()),
        ("old_verify_keys".to_owned(), old.into()),
        ("valid_until_ts".to_owned(), int(valid_until_ts)?),
    ]);
    ruma::signatures::sign_json(server_name.as_str(), key.key_pair(), &mut document)
        .map_err(|e| KeyError::Malformed(e.to_string()))?;
    Ok(document)
}

fn key_object(public_key: &str) -> CanonicalJsonValue {
    CanonicalJsonObject::from([("key".to_owned(), public_key.into())]).into()
}

fn int(value: u64) -> Result<CanonicalJsonValue, KeyError> {
    ruma::Int::try_from(value)
        .map(CanonicalJsonValue::Integer)
        .map_err(|_| KeyError::Malformed(format!("{value} is out of JSON's integer range")))
}

/// What a checked key document says: the keys in use, those retired, and until when the
/// document may be relied on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerKeys {
    /// Key id → public key (unpadded base64).
    pub verify_keys: BTreeMap<String, String>,
    /// Key id → (public key, when it stopped being used).
    pub old_verify_keys: BTreeMap<String, (String, u64)>,
    pub valid_until_ts: u64,
}

/// Checks a key document of `server`: it names that server, and it is signed by at least one of
/// the keys it lists and by every listed key that signed it. Signatures of other servers (a
/// notary's) are left to the caller.
pub fn verify_key_document(
    document: &CanonicalJsonObject,
    server: &ServerName,
) -> Result<ServerKeys, KeyError> {
    let malformed = |what: &str| KeyError::Malformed(what.to_owned());
    let found = document.get("server_name").and_then(as_str).ok_or_else(|| malformed("no server_name"))?;
    if found != server.as_str() {
        return Err(KeyError::WrongServer { expected: server.to_string(), found: found.to_owned() });
    }
    let typed: ruma::api::federation::discovery::ServerSigningKeys =
        serde_json::from_value(CanonicalJsonValue::Object(document.clone()).into())
            .map_err(|e| KeyError::Malformed(e.to_string()))?;
    let valid_until_ts = u64::from(typed.valid_until_ts.0);
    let verify_keys: BTreeMap<String, String> =
        typed.verify_keys.iter().map(|(id, VerifyKey { key, .. })| (id.to_string(), key.encode())).collect();
    if verify_keys.is_empty() {
        return Err(malformed("no verify_keys"));
    }
    let old_verify_keys = typed
        .old_verify_keys
        .iter()
        .map(|(id, OldVerifyKey { key, expired_ts, .. })| {
            (id.to_string(), (key.encode(), u64::from(expired_ts.0)))
        })
        .collect();

    // Only this server's signatures are checked here.
    let mut own = document.clone();
    let signatures = match document.get("signatures") {
        Some(CanonicalJsonValue::Object(all)) => all.get(server.as_str()).cloned(),
        _ => None,
    }
    .ok_or_else(|| KeyError::BadSignature("no signature of the server itself".into()))?;
    own.insert("signatures".into(), CanonicalJsonObject::from([(server.to_string(), signatures)]).into());
    let keys: PublicKeySet =
        typed.verify_keys.iter().map(|(id, VerifyKey { key, .. })| (id.to_string(), key.clone())).collect();
    let map: PublicKeyMap = BTreeMap::from([(server.to_string(), keys)]);
    ruma::signatures::verify_json(&map, &own).map_err(|e| KeyError::BadSignature(e.to_string()))?;
    Ok(ServerKeys { verify_keys, old_verify_keys, valid_until_ts })
}

/// Checks that `notary` vouches for a key document: it carries a signature by one of `keys`
/// (key id → public key, unpadded base64), and every signature by those keys holds. The
/// document's own signatures are [`verify_key_document`]'s.
pub fn verify_notary_signature(
    document: &CanonicalJsonObject,
    notary: &ServerName,
    keys: &BTreeMap<String, String>,
) -> Result<(), KeyError> {
    let by_notary = match document.get("signatures") {
        Some(CanonicalJsonValue::Object(all)) => match all.get(notary.as_str()) {
            Some(CanonicalJsonValue::Object(by_key)) => by_key.clone(),
            _ => CanonicalJsonObject::new(),
        },
        _ => CanonicalJsonObject::new(),
    };
    let known: CanonicalJsonObject = by_notary.into_iter().filter(|(id, _)| keys.contains_key(id)).collect();
    if known.is_empty() {
        return Err(KeyError::BadSignature(format!("no signature of {notary} by a key it is trusted with")));
    }
    let mut vouched = document.clone();
    vouched.insert(
        "signatures".into(),
        CanonicalJsonObject::from([(notary.to_string(), CanonicalJsonValue::Object(known))]).into(),
    );
    let set = public_key_set(keys).map_err(|e| KeyError::Malformed(format!("a key of {notary}: {e}")))?;
    let map: PublicKeyMap = BTreeMap::from([(notary.to_string(), set)]);
    ruma::signatures::verify_json(&map, &vouched).map_err(|e| KeyError::BadSignature(e.to_string()))
}

/// Keys as ruma checks signatures with them, from key id → public key (unpadded base64).
pub fn public_key_set(keys: &BTreeMap<String, String>) -> Result<PublicKeySet, String> {
    keys.iter()
        .map(|(id, key)| {
            ruma::serde::Base64::parse(key)
                .map(|key| (id.clone(), key))
                .map_err(|e| format!("bad key {id}: {e}"))
        })
        .collect()
}

fn as_str(value: &CanonicalJsonValue) -> Option<&str> {
    match value {
        CanonicalJsonValue::String(text) => Some(text),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        let dir = std::env::temp_dir().join(format!("hearth-keys-{}", rand_suffix()));
        let key = SigningKey::load_or_generate(&dir.join("signing.key")).unwrap();
        let _ = std::fs::remove_dir_all(dir);
        key
    }

    fn rand_suffix() -> String {
        format!("{:?}", std::time::SystemTime::now()).chars().filter(char::is_ascii_digit).collect()
    }

    #[test]
    fn a_document_signed_here_checks_out_with_its_old_keys() {
        let server = <&ServerName>::try_from("127.0.0.1:8448").unwrap();
        let key = key();
        let old = OldKey { key_id: "ed25519:old".into(), public_key: key.public_key_base64(), expired_ts: 5 };
        let document = own_key_document(server, &key, &[old], 1_000).unwrap();
        let keys = verify_key_document(&document, server).unwrap();
        assert_eq!(keys.verify_keys[&key.key_id()], key.public_key_base64());
        assert_eq!(keys.old_verify_keys["ed25519:old"], (key.public_key_base64(), 5));
        assert_eq!(keys.valid_until_ts, 1_000);
    }

    #[test]
    fn a_tampered_document_or_another_servers_is_refused() {
        let server = <&ServerName>::try_from("a.example").unwrap();
        let key = key();
        let mut document = own_key_document(server, &key, &[], 1_000).unwrap();
        let other = <&ServerName>::try_from("b.example").unwrap();
        assert!(matches!(verify_key_document(&document, other), Err(KeyError::WrongServer { .. })));
        document.insert("valid_until_ts".into(), int(9_999_999).unwrap());
        assert!(matches!(verify_key_document(&document, server), Err(KeyError::BadSignature(_))));
        // Signed by a key it does not list.
        let stranger = key_pair_document(server);
        assert!(matches!(verify_key_document(&stranger, server), Err(KeyError::BadSignature(_))));
    }

    #[test]
    fn a_notary_vouches_only_with_a_key_it_is_trusted_with() {
        let (server, notary) =
            (<&ServerName>::try_from("a.example").unwrap(), <&ServerName>::try_from("n.example").unwrap());
        let (own, notary_key, stranger) = (key(), key(), key());
        let mut document = own_key_document(server, &own, &[], 1_000).unwrap();
        let trusted = BTreeMap::from([(notary_key.key_id(), notary_key.public_key_base64())]);
        assert!(
            matches!(verify_notary_signature(&document, notary, &trusted), Err(KeyError::BadSignature(_))),
            "unsigned by the notary"
        );
        ruma::signatures::sign_json(notary.as_str(), notary_key.key_pair(), &mut document).unwrap();
        verify_notary_signature(&document, notary, &trusted).unwrap();
        verify_key_document(&document, server).unwrap();
        let other = BTreeMap::from([(notary_key.key_id(), stranger.public_key_base64())]);
        assert!(
            matches!(verify_notary_signature(&document, notary, &other), Err(KeyError::BadSignature(_))),
            "another key"
        );
        document.insert("valid_until_ts".into(), int(9_999_999).unwrap());
        assert!(
            matches!(verify_notary_signature(&document, notary, &trusted), Err(KeyError::BadSignature(_))),
            "altered"
        );
    }

    /// A document listing one key and signed by another.
    fn key_pair_document(server: &ServerName) -> CanonicalJsonObject {
        let (listed, signer) = (key(), key());
        let verify_keys =
            CanonicalJsonObject::from([(listed.key_id(), key_object(&listed.public_key_base64()))]);
        let mut document = CanonicalJsonObject::from([
            ("server_name".to_owned(), server.as_str().into()),
            ("verify_keys".to_owned(), verify_keys.into()),
            ("valid_until_ts".to_owned(), int(1_000).unwrap()),
        ]);
        ruma::signatures::sign_json(server.as_str(), signer.key_pair(), &mut document).unwrap();
        document
    }
}
