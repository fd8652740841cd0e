//! End-to-end encryption support over HTTP: keys, claims, to-device messages, device lists.

use std::collections::BTreeSet;

use ruma::{
    CanonicalJsonObject,
    serde::{Base64, base64::Standard},
    signatures::{Ed25519KeyPair, sign_json},
};
use serde_json::{Value, json};

use crate::common::{Db, Session, TestServer, assert_error, session_of};

const PW: &str = "correct horse battery";

/// A device's signing key, as a client holds it.
pub(crate) struct DeviceKey {
    pair: Ed25519KeyPair,
    public: String,
}

impl DeviceKey {
    pub(crate) fn new(device_id: &str) -> Self {
        Self::with_name(|_| device_id.to_owned())
    }

    /// A key whose name (the part of its key id after `ed25519:`) comes from its public key.
    fn with_name(name: impl FnOnce(&str) -> String) -> Self {
        let der = Ed25519KeyPair::generate();
        let probe = Ed25519KeyPair::from_der(&der, String::new()).unwrap();
        let public = Base64::<Standard>::new(probe.public_key().to_vec()).encode();
        let pair = Ed25519KeyPair::from_der(&der, name(&public)).unwrap();
        Self { pair, public }
    }

    fn sign(&self, user_id: &str, object: Value) -> Value {
        let mut object: CanonicalJsonObject = serde_json::from_value(object).unwrap();
        sign_json(user_id, &self.pair, &mut object).unwrap();
        serde_json::to_value(object).unwrap()
    }

    /// The device's signed identity keys.
    pub(crate) fn device_keys(&self, who: &Session) -> Value {
        let device = &who.device_id;
        self.sign(
            &who.user_id,
            json!({
                "user_id": who.user_id,
                "device_id": device,
                "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
                "keys": {
                    format!("ed25519:{device}"): self.public,
                    format!("curve25519:{device}"): format!("curve-of-{device}"),
                },
            }),
        )
    }

    /// `n` signed one-time keys, ids starting at `first`.
    pub(crate) fn one_time_keys(&self, who: &Session, first: usize, n: usize) -> Value {
        let keys: serde_json::Map<String, Value> = (first..first + n)
            .map(|i| {
                (
                    format!("signed_curve25519:AAAA{i}"),
                    self.sign(&who.user_id, json!({"key": format!("otk{i}")})),
                )
            })
            .collect();
        Value::Object(keys)
    }
}

/// A cross-signing key of `owner` for `usage`, named after its own public key, signed by
/// `signed_by` (the master key) if given.
pub(crate) fn cross_key(owner: &str, usage: &str, signed_by: Option<&DeviceKey>) -> (DeviceKey, Value) {
    let key = DeviceKey::with_name(str::to_owned);
    let object =
        json!({"user_id": owner, "usage": [usage], "keys": {format!("ed25519:{}", key.public): key.public}});
    let object = match signed_by {
        Some(master) => master.sign(owner, object),
        None => object,
    };
    (key, object)
}

/// Device keys with made-up (not base64) keys and self-signature, `ed25519` the identity key.
fn made_up_with(who: &Session, ed25519: &str) -> Value {
    let device = &who.device_id;
    json!({
        "user_id": who.user_id, "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {format!("curve25519:{device}"): "curve25519+key", format!("ed25519:{device}"): ed25519},
        "signatures": {who.user_id.clone(): {format!("ed25519:{device}"): "self+signature"}},
    })
}

pub(crate) async fn upload(server: &TestServer, who: &Session, body: Value) -> (u16, Value) {
    server.post("/_matrix/client/v3/keys/upload", Some(&who.token), body).await
}

async fn sync(server: &TestServer, who: &Session, since: Option<&str>) -> Value {
    let path = match since {
        Some(since) => format!("/_matrix/client/v3/sync?since={since}&timeout=0"),
        None => "/_matrix/client/v3/sync".to_owned(),
    };
    let (status, body) = server.get(&path, Some(&who.token)).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn next(sync: &Value) -> String {
    sync["next_batch"].as_str().unwrap().to_owned()
}

async fn send_to_device(server: &TestServer, who: &Session, txn: &str, messages: Value) -> (u16, Value) {
    let path = format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/{txn}");
    server.request("PUT", &path, Some(&who.token), Some(json!({"messages": messages}))).await
}

fn to_device_events(sync: &Value) -> Vec<Value> {
    sync["to_device"]["events"].as_array().cloned().unwrap_or_default()
}

async fn shared_room(server: &TestServer, alice: &Session, bob: &Session) -> String {
    let (status, created) = server
        .post("/_matrix/client/v3/createRoom", Some(&alice.token), json!({"invite": [bob.user_id]}))
        .await;
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().unwrap().to_owned();
    let join = format!("/_matrix/client/v3/rooms/{room}/join");
    assert_eq!(server.post(&join, Some(&bob.token), json!({})).await.0, 200);
    room
}

fn backup_key(index: u64, forwarded: u64, verified: bool, marker: &str) -> Value {
    json!({"first_message_index": index, "forwarded_count": forwarded, "is_verified": verified,
           "session_data": {"ephemeral": marker, "ciphertext": marker, "mac": marker}})
}

crate::on_both_backends! {
    async fn cross_signing(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let device = DeviceKey::new(&alice.device_id);
        assert_eq!(upload(&server, &alice, json!({"device_keys": device.device_keys(&alice)})).await.0, 200);
        let (master, master_json) = cross_key(&alice.user_id, "master", None);
        let (ssk, ssk_json) = cross_key(&alice.user_id, "self_signing", Some(&master));
        let (usk, usk_json) = cross_key(&alice.user_id, "user_signing", Some(&master));
        let signing_upload = "/_matrix/client/v3/keys/device_signing/upload";

        // Refused: a self-signing key the master key did not sign, keys naming someone else.
        let (_, unsigned_ssk) = cross_key(&alice.user_id, "self_signing", Some(&ssk));
        let refused = server.post(signing_upload, Some(&alice.token), json!({"master_key": master_json, "self_signing_key": unsigned_ssk})).await;
        assert_error(&refused, 400, "M_BAD_JSON");
        let (_, bobs) = cross_key(&bob.user_id, "master", None);
        assert_error(&server.post(signing_upload, Some(&alice.token), json!({"master_key": bobs})).await, 400, "M_BAD_JSON");

        // The first upload needs no password; replacing keys does.
        let keys = json!({"master_key": master_json, "self_signing_key": ssk_json, "user_signing_key": usk_json});
        let (status, body) = server.post(signing_upload, Some(&alice.token), keys.clone()).await;
        assert_eq!(status, 200, "{body}");
        let (status, challenge) = server.post(signing_upload, Some(&alice.token), keys.clone()).await;
        assert_eq!(status, 401, "{challenge}");
        let mut with_auth = keys.clone();
        with_auth["auth"] = json!({"type": "m.login.password", "session": challenge["session"],
            "identifier": {"type": "m.id.user", "user": "alice"}, "password": PW});
        assert_eq!(server.post(signing_upload, Some(&alice.token), with_auth).await.0, 200);
        // The password stage's pre-r0.4 form (`user`, no identifier), in one step, at the unstable
        // path SyTest uses: taken as Synapse takes it; a wrong password still is not.
        let unstable = "/_matrix/client/unstable/keys/device_signing/upload";
        let mut legacy = json!({"user_signing_key": usk_json});
        legacy["auth"] = json!({"type": "m.login.password", "user": alice.user_id, "password": "wrong"});
        assert_eq!(server.post(unstable, Some(&alice.token), legacy.clone()).await.0, 401);
        legacy["auth"]["password"] = json!(PW);
        let (status, body) = server.post(unstable, Some(&alice.token), legacy).await;
        assert_eq!(status, 200, "{body}");

        // Everyone sees master and self-signing keys; only alice her user-signing key.
        let query = |who: &Session, whom: &str| {
            let (server, token, whom) = (&server, who.token.clone(), whom.to_owned());
            async move { server.post("/_matrix/client/v3/keys/query", Some(&token), json!({"device_keys": {whom: []}})).await.1 }
        };
        let seen_by_bob = query(&bob, &alice.user_id).await;
        assert_eq!(seen_by_bob["master_keys"][&alice.user_id]["keys"][format!("ed25519:{}", master.public)], master.public);
        assert!(seen_by_bob["self_signing_keys"][&alice.user_id].is_object(), "{seen_by_bob}");
        assert!(seen_by_bob["user_signing_keys"].get(&alice.user_id).is_none(), "{seen_by_bob}");
        assert!(query(&alice, &alice.user_id).await["user_signing_keys"][&alice.user_id].is_object());

        // Alice's self-signing key signs her device; the signature shows and survives the
        // device uploading its keys again.
        let signatures_upload = "/_matrix/client/v3/keys/signatures/upload";
        let signed_device = ssk.sign(&alice.user_id, device.device_keys(&alice));
        let (status, result) = server.post(signatures_upload, Some(&alice.token),
            json!({alice.user_id.clone(): {alice.device_id.clone(): signed_device}})).await;
        assert_eq!(status, 200, "{result}");
        assert!(result["failures"].as_object().is_none_or(serde_json::Map::is_empty), "{result}");
        assert_eq!(upload(&server, &alice, json!({"device_keys": device.device_keys(&alice)})).await.0, 200);
        let ssk_id = format!("ed25519:{}", ssk.public);
        let shown = query(&bob, &alice.user_id).await;
        assert!(shown["device_keys"][&alice.user_id][&alice.device_id]["signatures"][&alice.user_id][&ssk_id].is_string(), "{shown}");

        // A signature by the wrong key is a failure for that key, not for the request.
        let forged = usk.sign(&alice.user_id, device.device_keys(&alice));
        let (status, result) = server.post(signatures_upload, Some(&alice.token),
            json!({alice.user_id.clone(): {alice.device_id.clone(): forged}})).await;
        assert_eq!(status, 200);
        assert_eq!(result["failures"][&alice.user_id][&alice.device_id]["errcode"], "M_INVALID_SIGNATURE", "{result}");

        // Alice's user-signing key signs bob's master key: alice sees it, bob does not.
        let (bob_master, bob_master_json) = cross_key(&bob.user_id, "master", None);
        assert_eq!(server.post(signing_upload, Some(&bob.token), json!({"master_key": bob_master_json})).await.0, 200);
        let signed_bob = usk.sign(&alice.user_id, bob_master_json.clone());
        let (status, result) = server.post(signatures_upload, Some(&alice.token),
            json!({bob.user_id.clone(): {bob_master.public.clone(): signed_bob}})).await;
        assert_eq!(status, 200, "{result}");
        assert!(result["failures"].as_object().is_none_or(serde_json::Map::is_empty), "{result}");
        let usk_id = format!("ed25519:{}", usk.public);
        assert!(query(&alice, &bob.user_id).await["master_keys"][&bob.user_id]["signatures"][&alice.user_id][&usk_id].is_string());
        assert!(query(&bob, &bob.user_id).await["master_keys"][&bob.user_id]["signatures"].get(&alice.user_id).is_none());
        server.stop().await;
    }

    async fn key_backup(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let token = Some(alice.token.as_str());
        let algorithm = json!({"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "abc"}});
        assert_error(&server.post("/_matrix/client/v3/room_keys/version", token, json!({"algorithm": 1})).await, 400, "M_BAD_JSON");
        assert_error(&server.get("/_matrix/client/v3/room_keys/version", token).await, 404, "M_NOT_FOUND");
        let (status, created) = server.post("/_matrix/client/v3/room_keys/version", token, algorithm.clone()).await;
        assert_eq!(status, 200, "{created}");
        assert_eq!(created["version"], "1");
        let (_, latest) = server.get("/_matrix/client/v3/room_keys/version", token).await;
        assert_eq!((latest["version"].as_str(), latest["count"].as_u64()), (Some("1"), Some(0)), "{latest}");
        assert_eq!(latest["auth_data"]["public_key"], "abc");

        let room = "!room:localhost";
        let session_path = |version: &str| format!("/_matrix/client/v3/room_keys/keys/{}/S1?version={version}", room.replace('!', "%21").replace(':', "%3A"));
        let put = |version: &'static str, key: Value| {
            let path = session_path(version);
            let server = &server;
            async move { server.request("PUT", &path, token, Some(key)).await }
        };
        let stored = || async { server.get(&session_path("1"), token).await.1 };
        let (status, first) = put("1", backup_key(5, 1, false, "a")).await;
        assert_eq!((status, first["count"].as_u64()), (200, Some(1)), "{first}");
        // Worse (later first message) is ignored; the etag says nothing changed.
        let (_, same) = put("1", backup_key(7, 0, false, "b")).await;
        assert_eq!(same["etag"], first["etag"]);
        assert_eq!(stored().await["session_data"]["ciphertext"], "a");
        // Verified beats unverified, even from a later message.
        let (_, better) = put("1", backup_key(9, 3, true, "c")).await;
        assert_ne!(better["etag"], first["etag"]);
        assert_eq!(stored().await["session_data"]["ciphertext"], "c");
        put("1", backup_key(0, 0, false, "d")).await;
        assert_eq!(stored().await["session_data"]["ciphertext"], "c", "unverified never beats verified");
        // Then the earlier first message, then fewer forwards.
        put("1", backup_key(2, 5, true, "e")).await;
        assert_eq!(stored().await["session_data"]["ciphertext"], "e");
        put("1", backup_key(2, 1, true, "f")).await;
        assert_eq!(stored().await["first_message_index"], 2);
        assert_eq!(stored().await["session_data"]["ciphertext"], "f");

        // Many sessions at once, read back whole, by room, by session.
        let (status, bulk) = server.request("PUT", "/_matrix/client/v3/room_keys/keys?version=1", token, Some(json!({"rooms": {
            room: {"sessions": {"S2": backup_key(0, 0, false, "s2"), "S3": backup_key(0, 0, false, "s3")}},
            "!other:localhost": {"sessions": {"S4": backup_key(0, 0, false, "s4")}}}}))).await;
        assert_eq!((status, bulk["count"].as_u64()), (200, Some(4)), "{bulk}");
        let (_, all) = server.get("/_matrix/client/v3/room_keys/keys?version=1", token).await;
        assert_eq!(all["rooms"][room]["sessions"].as_object().unwrap().len(), 3, "{all}");
        assert_eq!(all["rooms"]["!other:localhost"]["sessions"]["S4"]["session_data"]["ciphertext"], "s4");
        let room_path = "/_matrix/client/v3/room_keys/keys/%21other%3Alocalhost?version=1";
        assert_eq!(server.get(room_path, token).await.1["sessions"]["S4"]["forwarded_count"], 0);
        let missing = "/_matrix/client/v3/room_keys/keys/%21other%3Alocalhost/NOPE?version=1";
        assert_error(&server.get(missing, token).await, 404, "M_NOT_FOUND");
        let (_, deleted) = server.request("DELETE", room_path, token, None).await;
        assert_eq!(deleted["count"], 3, "{deleted}");

        // Bad input: malformed sessions, unknown versions.
        let (status, _) = put("1", json!({"first_message_index": 0, "forwarded_count": 0, "is_verified": "yes", "session_data": {}})).await;
        assert_eq!(status, 400);
        assert_error(&server.get("/_matrix/client/v3/room_keys/keys?version=abc", token).await, 404, "M_NOT_FOUND");
        assert_error(&server.get("/_matrix/client/v3/room_keys/version/9", token).await, 404, "M_NOT_FOUND");

        // A new version: writes to the old one are refused with the current one named.
        let (_, second) = server.post("/_matrix/client/v3/room_keys/version", token, algorithm.clone()).await;
        assert_eq!(second["version"], "2");
        let refused = put("1", backup_key(0, 0, true, "z")).await;
        assert_error(&refused, 403, "M_WRONG_ROOM_KEYS_VERSION");
        assert_eq!(refused.1["current_version"], "2");
        assert_eq!(server.get("/_matrix/client/v3/room_keys/keys?version=1", token).await.0, 200, "old versions stay readable");
        assert_eq!(server.request("DELETE", "/_matrix/client/v3/room_keys/version/1", None, None).await.0, 401);
        assert_eq!(server.request("DELETE", "/_matrix/client/v3/room_keys/version/1", token, None).await.0, 200);
        assert_error(&server.get("/_matrix/client/v3/room_keys/version/1", token).await, 404, "M_NOT_FOUND");
        assert_error(&server.get("/_matrix/client/v3/room_keys/keys?version=1", token).await, 404, "M_NOT_FOUND");
        assert_error(&server.request("DELETE", "/_matrix/client/v3/room_keys/version/1", token, None).await, 404, "M_NOT_FOUND");

        // Updating: new auth data yes, another algorithm no.
        let mut updated = algorithm.clone();
        updated["auth_data"]["public_key"] = json!("def");
        assert_eq!(server.request("PUT", "/_matrix/client/v3/room_keys/version/2", token, Some(updated)).await.0, 200);
        assert_eq!(server.get("/_matrix/client/v3/room_keys/version/2", token).await.1["auth_data"]["public_key"], "def");
        let other = json!({"algorithm": "org.example.other", "auth_data": {}});
        assert_error(&server.request("PUT", "/_matrix/client/v3/room_keys/version/2", token, Some(other)).await, 400, "M_INVALID_PARAM");

        // auth_data is the owner's opaque data: any JSON value is kept as given (as Synapse
        // does), but it must be there.
        let opaque = json!({"algorithm": "m.megolm_backup.v1", "auth_data": "anopaquestring"});
        let (status, created) = server.post("/_matrix/client/v3/room_keys/version", token, opaque).await;
        assert_eq!(status, 200, "{created}");
        let path = format!("/_matrix/client/v3/room_keys/version/{}", created["version"].as_str().unwrap());
        let version = created["version"].as_str().unwrap();
        let updated = json!({"algorithm": "m.megolm_backup.v1", "auth_data": "adifferentopaquestring", "version": version});
        assert_eq!(server.request("PUT", &path, token, Some(updated)).await.0, 200);
        assert_eq!(server.get(&path, token).await.1["auth_data"], "adifferentopaquestring");
        let missing = server.post("/_matrix/client/v3/room_keys/version", token, json!({"algorithm": "m.megolm_backup.v1"})).await;
        assert_eq!(missing.0, 400, "{}", missing.1);
        // A version in the body equal to the path's, written as a number, names the same version.
        let numbered = json!({"algorithm": "m.megolm_backup.v1", "auth_data": "x", "version": version.parse::<u64>().unwrap()});
        assert_eq!(server.request("PUT", &path, token, Some(numbered)).await.0, 200);
        let elsewhere = json!({"algorithm": "m.megolm_backup.v1", "auth_data": "x", "version": "999"});
        assert_error(&server.request("PUT", &path, token, Some(elsewhere)).await, 400, "M_INVALID_PARAM");
        // Session data is opaque too: a string is kept as given.
        let key_path = format!("/_matrix/client/v3/room_keys/keys/!abcd/1234?version={version}");
        let key = json!({"first_message_index": 3, "forwarded_count": 0, "is_verified": false, "session_data": "anopaquestring"});
        let (status, body) = server.request("PUT", &key_path, token, Some(key)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(server.get(&key_path, token).await.1["session_data"], "anopaquestring");
        server.stop().await;
    }

    async fn keys_upload_query_claim(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let key = DeviceKey::new(&alice.device_id);

        // Identity keys, five one-time keys and a fallback key.
        let fallback = key.sign(&alice.user_id, json!({"key": "fallback", "fallback": true}));
        let (status, counts) = upload(&server, &alice, json!({
            "device_keys": key.device_keys(&alice),
            "one_time_keys": key.one_time_keys(&alice, 0, 5),
            "fallback_keys": {"signed_curve25519:FB1": fallback},
        })).await;
        assert_eq!(status, 200, "{counts}");
        assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 5);
        // The same identity keys again are fine; the same key ids with other keys are not.
        assert_eq!(upload(&server, &alice, json!({"device_keys": key.device_keys(&alice)})).await.0, 200);
        let changed = upload(&server, &alice, json!({"one_time_keys": {
            "signed_curve25519:AAAA0": key.sign(&alice.user_id, json!({"key": "other"}))}})).await;
        assert_error(&changed, 400, "M_BAD_JSON");

        // Refused: other identity keys for the same device, keys naming another device,
        // malformed objects, one-time keys not signed by the (self-signed) device.
        let impostor = DeviceKey::new(&alice.device_id);
        assert_error(&upload(&server, &alice, json!({"device_keys": impostor.device_keys(&alice)})).await, 400, "M_BAD_JSON");
        let mut elsewhere = key.device_keys(&alice);
        elsewhere["device_id"] = json!("SOMEOTHER");
        assert_error(&upload(&server, &alice, json!({"device_keys": elsewhere})).await, 400, "M_BAD_JSON");
        assert_error(&upload(&server, &alice, json!({"device_keys": {"user_id": alice.user_id}})).await, 400, "M_BAD_JSON");
        let forged_otk = impostor.sign(&alice.user_id, json!({"key": "forged"}));
        assert_error(&upload(&server, &alice, json!({"one_time_keys": {"signed_curve25519:X": forged_otk}})).await, 400, "M_BAD_JSON");
        assert_error(&upload(&server, &alice, json!({"one_time_keys": {"nocolon": "abc"}})).await, 400, "M_BAD_JSON");
        assert_eq!(upload(&server, &alice, json!({"one_time_keys": "not a map"})).await.0, 400);

        // Bob queries: alice's device with its name, nothing for unknown users, a failure for
        // other servers.
        let (status, query) = server.post("/_matrix/client/v3/keys/query", Some(&bob.token), json!({"device_keys": {
            alice.user_id.clone(): [], "@nobody:localhost": [], "@someone:elsewhere.example": []}})).await;
        assert_eq!(status, 200, "{query}");
        let device = &query["device_keys"][&alice.user_id][&alice.device_id];
        assert_eq!(device["keys"][format!("ed25519:{}", alice.device_id)], key.public);
        assert!(device["signatures"][&alice.user_id].is_object());
        assert_eq!(query["device_keys"]["@nobody:localhost"], json!({}));
        assert!(query["failures"]["elsewhere.example"].is_object(), "{query}");

        // Ten concurrent claims: five distinct one-time keys, then the fallback key.
        let claims = (0..10).map(|_| {
            let (base, token, user, device) = (server.base.clone(), bob.token.clone(), alice.user_id.clone(), alice.device_id.clone());
            tokio::spawn(async move {
                let body = json!({"one_time_keys": {user.clone(): {device.clone(): "signed_curve25519"}}});
                let response: Value = reqwest::Client::new().post(format!("{base}/_matrix/client/v3/keys/claim"))
                    .bearer_auth(token).json(&body).send().await.unwrap().json().await.unwrap();
                let keys = response["one_time_keys"][&user][&device].as_object().cloned().unwrap_or_default();
                assert_eq!(keys.len(), 1, "{response}");
                let (id, key) = keys.into_iter().next().unwrap();
                (id, key["key"].as_str().unwrap().to_owned())
            })
        });
        let mut claimed = Vec::new();
        for claim in claims {
            claimed.push(claim.await.unwrap());
        }
        let one_time: BTreeSet<&String> = claimed.iter().filter(|(id, _)| id != "signed_curve25519:FB1").map(|(id, _)| id).collect();
        assert_eq!(one_time.len(), 5, "each one-time key went to one claimer: {claimed:?}");
        assert_eq!(claimed.iter().filter(|(_, key)| key == "fallback").count(), 5, "{claimed:?}");
        // Unknown users and devices have nothing to give; that is not an error.
        let (status, none) = server.post("/_matrix/client/v3/keys/claim", Some(&bob.token), json!({"one_time_keys": {
            "@nobody:localhost": {"DEV": "signed_curve25519"}, alice.user_id.clone(): {"NOSUCH": "signed_curve25519"}}})).await;
        assert_eq!(status, 200, "{none}");
        assert_eq!(none["one_time_keys"], json!({}));

        // Alice's sync says her keys are gone and the fallback key was used.
        let synced = sync(&server, &alice, None).await;
        assert_eq!(synced["device_one_time_keys_count"]["signed_curve25519"], 0, "{synced}");
        assert_eq!(synced["device_unused_fallback_key_types"], json!([]));
        let fresh = key.sign(&alice.user_id, json!({"key": "fallback2", "fallback": true}));
        let (_, counts) = upload(&server, &alice, json!({
            "one_time_keys": key.one_time_keys(&alice, 10, 3), "fallback_keys": {"signed_curve25519:FB2": fresh}})).await;
        assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 3);
        let synced = sync(&server, &alice, Some(&next(&synced))).await;
        assert_eq!(synced["device_one_time_keys_count"]["signed_curve25519"], 3, "{synced}");
        assert_eq!(synced["device_unused_fallback_key_types"], json!(["signed_curve25519"]));
        server.stop().await;
    }

    async fn device_keys_need_the_spec_shape_but_not_a_verifying_self_signature_as_in_synapse(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let device = alice.device_id.clone();
        // Made-up keys and signature, as SyTest uploads: taken (clients check self-signatures).
        let made_up = json!({
            "user_id": alice.user_id, "device_id": device,
            "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
            "keys": {format!("curve25519:{device}"): "curve25519+key", format!("ed25519:{device}"): "ed25519+key"},
            "signatures": {alice.user_id.clone(): {format!("ed25519:{device}"): "self+signature"}},
        });
        let (status, body) = upload(&server, &alice, json!({"device_keys": made_up, "one_time_keys": {"my_algorithm:my_id_1": "abc"}})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["one_time_key_counts"]["my_algorithm"], 1);
        let (_, query) = server.post("/_matrix/client/v3/keys/query", Some(&bob.token), json!({"device_keys": {alice.user_id.clone(): []}})).await;
        assert_eq!(query["device_keys"][&alice.user_id][&device]["keys"][format!("ed25519:{device}")], "ed25519+key", "{query}");
        assert_eq!(query["device_keys"][&alice.user_id][&device]["unsigned"], json!({}), "always there, empty without a name");
        // Its identity keys still never change.
        let mut other = made_up_with(&alice, "other+key");
        assert_error(&upload(&server, &alice, json!({"device_keys": other.take()})).await, 400, "M_BAD_JSON");

        // The shape is the spec's: every field, of the right types, naming the uploader.
        let base = made_up_with(&alice, "ed25519+key");
        for (field, value) in [("algorithms", json!("m.olm")), ("keys", json!({"a": 1})), ("signatures", json!({"x": "y"})),
                               ("user_id", json!(bob.user_id)), ("device_id", json!("ELSEWHERE"))] {
            let mut wrong = base.clone();
            wrong[field] = value;
            assert_error(&upload(&server, &alice, json!({"device_keys": wrong})).await, 400, "M_BAD_JSON");
        }
        for field in ["algorithms", "keys", "signatures"] {
            let mut missing = base.clone();
            missing.as_object_mut().unwrap().remove(field);
            assert_error(&upload(&server, &alice, json!({"device_keys": missing})).await, 400, "M_BAD_JSON");
        }

        // A self-signed device's signed one-time keys must be signed by it.
        let carol = server.register("carol", PW).await;
        let key = DeviceKey::new(&carol.device_id);
        assert_eq!(upload(&server, &carol, json!({"device_keys": key.device_keys(&carol)})).await.0, 200);
        let forged = DeviceKey::new(&carol.device_id).sign(&carol.user_id, json!({"key": "forged"}));
        assert_error(&upload(&server, &carol, json!({"one_time_keys": {"signed_curve25519:X": forged}})).await, 400, "M_BAD_JSON");
        let genuine = key.sign(&carol.user_id, json!({"key": "genuine"}));
        assert_eq!(upload(&server, &carol, json!({"one_time_keys": {"signed_curve25519:Y": genuine}})).await.0, 200);
        server.stop().await;
    }

    async fn renaming_a_device_puts_its_user_in_device_lists_changed_for_room_mates(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        shared_room(&server, &alice, &bob).await;
        let since = sync(&server, &alice, None).await["next_batch"].as_str().unwrap().to_owned();
        let path = format!("/_matrix/client/v3/devices/{}", bob.device_id);
        assert_eq!(server.request("PUT", &path, Some(&bob.token), Some(json!({"display_name": "wibble"}))).await.0, 200);
        let after = sync(&server, &alice, Some(&since)).await;
        let changed = after["device_lists"]["changed"].as_array().cloned().unwrap_or_default();
        assert!(changed.contains(&json!(bob.user_id)), "{after}");
        server.stop().await;
    }

    async fn a_new_user_signing_key_is_news_to_its_owner_only(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        shared_room(&server, &alice, &bob).await;
        let signing_upload = "/_matrix/client/v3/keys/device_signing/upload";
        let changed = |sync: &Value| sync["device_lists"]["changed"].as_array().cloned().unwrap_or_default();
        // Master and self-signing keys: everyone who shares a room is told.
        let (master, master_json) = cross_key(&alice.user_id, "master", None);
        let (_, ssk_json) = cross_key(&alice.user_id, "self_signing", Some(&master));
        let (alice_since, bob_since) = (next(&sync(&server, &alice, None).await), next(&sync(&server, &bob, None).await));
        let keys = json!({"master_key": master_json, "self_signing_key": ssk_json});
        assert_eq!(server.post(signing_upload, Some(&alice.token), keys).await.0, 200);
        let (alice_sync, bob_sync) = (sync(&server, &alice, Some(&alice_since)).await, sync(&server, &bob, Some(&bob_since)).await);
        assert!(changed(&alice_sync).contains(&json!(alice.user_id)), "{alice_sync}");
        assert!(changed(&bob_sync).contains(&json!(alice.user_id)), "{bob_sync}");
        // The user-signing key alone: only alice's own devices, which may see it.
        let (usk, usk_json) = cross_key(&alice.user_id, "user_signing", Some(&master));
        let (alice_since, bob_since) = (next(&alice_sync), next(&bob_sync));
        let body = json!({"user_signing_key": usk_json, "auth": {"type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": "alice"}, "password": PW}});
        let (status, answer) = server.post(signing_upload, Some(&alice.token), body).await;
        assert_eq!(status, 200, "{answer}");
        let (alice_sync, bob_sync) = (sync(&server, &alice, Some(&alice_since)).await, sync(&server, &bob, Some(&bob_since)).await);
        assert!(changed(&alice_sync).contains(&json!(alice.user_id)), "{alice_sync}");
        assert!(!changed(&bob_sync).contains(&json!(alice.user_id)), "{bob_sync}");
        // Alice signs bob's master key with it: her devices are told bob changed (for her);
        // bob is told nothing of alice.
        let (bob_master, bob_master_json) = cross_key(&bob.user_id, "master", None);
        assert_eq!(server.post(signing_upload, Some(&bob.token), json!({"master_key": bob_master_json})).await.0, 200);
        // Past bob's own upload, which everyone sharing a room with him is told of.
        let alice_since = next(&sync(&server, &alice, Some(&next(&alice_sync))).await);
        let bob_since = next(&sync(&server, &bob, Some(&next(&bob_sync))).await);
        let signed = usk.sign(&alice.user_id, bob_master_json);
        let (status, result) = server.post("/_matrix/client/v3/keys/signatures/upload", Some(&alice.token),
            json!({bob.user_id.clone(): {bob_master.public.clone(): signed}})).await;
        assert_eq!(status, 200, "{result}");
        assert!(result["failures"].as_object().is_none_or(serde_json::Map::is_empty), "{result}");
        let (alice_sync, bob_sync) = (sync(&server, &alice, Some(&alice_since)).await, sync(&server, &bob, Some(&bob_since)).await);
        assert!(changed(&alice_sync).contains(&json!(bob.user_id)), "{alice_sync}");
        assert!(!changed(&alice_sync).contains(&json!(alice.user_id)), "{alice_sync}");
        assert!(!changed(&bob_sync).contains(&json!(alice.user_id)), "{bob_sync}");
        server.stop().await;
    }

    async fn to_device_messages(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let (_, second) = server.login("alice", PW, json!({"device_id": "PHONE"})).await;
        let phone = session_of(&second);
        let since = next(&sync(&server, &alice, None).await);
        let phone_since = next(&sync(&server, &phone, None).await);

        // One message to one device, one to all of alice's devices; a retry is not a second.
        let one = json!({alice.user_id.clone(): {alice.device_id.clone(): {"ciphertext": "for the laptop"}}});
        assert_eq!(send_to_device(&server, &bob, "t1", one.clone()).await.0, 200);
        assert_eq!(send_to_device(&server, &bob, "t1", one).await.0, 200);
        assert_eq!(send_to_device(&server, &bob, "t2", json!({alice.user_id.clone(): {"*": {"ciphertext": "for all"}}})).await.0, 200);
        // Unknown devices and users: accepted and dropped.
        assert_eq!(send_to_device(&server, &bob, "t3", json!({alice.user_id.clone(): {"NOSUCH": {"a": 1}}, "@nobody:localhost": {"*": {"a": 1}}})).await.0, 200);
        // Bad input.
        let huge = "x".repeat(70_000);
        assert_error(&send_to_device(&server, &bob, "t4", json!({alice.user_id.clone(): {"*": {"blob": huge}}})).await, 413, "M_TOO_LARGE");
        assert_eq!(send_to_device(&server, &bob, "t5", json!({alice.user_id.clone(): {"*": "not an object"}})).await.0, 400);

        let laptop = sync(&server, &alice, Some(&since)).await;
        let events = to_device_events(&laptop);
        let contents: Vec<&str> = events.iter().map(|e| e["content"]["ciphertext"].as_str().unwrap()).collect();
        assert_eq!(contents, ["for the laptop", "for all"], "{laptop}");
        assert!(events.iter().all(|e| e["sender"] == bob.user_id && e["type"] == "m.room.encrypted"));
        let phone_sync = sync(&server, &phone, Some(&phone_since)).await;
        let contents: Vec<Value> = to_device_events(&phone_sync).iter().map(|e| e["content"]["ciphertext"].clone()).collect();
        assert_eq!(contents, [json!("for all")]);

        // Delivered again until acknowledged by a later token, then never again.
        let again = sync(&server, &alice, Some(&since)).await;
        assert_eq!(to_device_events(&again).len(), 2, "not acknowledged yet: {again}");
        let acked = sync(&server, &alice, Some(&next(&laptop))).await;
        assert!(to_device_events(&acked).is_empty(), "{acked}");
        let stale = sync(&server, &alice, Some(&since)).await;
        assert!(to_device_events(&stale).is_empty(), "acknowledged messages are gone: {stale}");

        // A backlog comes in batches of at most 100, in order.
        let mut since = next(&acked);
        for n in 0..150 {
            let body = json!({alice.user_id.clone(): {alice.device_id.clone(): {"n": n}}});
            assert_eq!(send_to_device(&server, &bob, &format!("b{n}"), body).await.0, 200);
        }
        let mut received = Vec::new();
        for _ in 0..3 {
            let batch = sync(&server, &alice, Some(&since)).await;
            let events = to_device_events(&batch);
            assert!(events.len() <= 100);
            received.extend(events.iter().map(|e| e["content"]["n"].as_i64().unwrap()));
            since = next(&batch);
        }
        assert_eq!(received, (0..150).collect::<Vec<_>>());

        // A long-poll wakes as soon as a message is queued for its device.
        let waiting = server.long_poll(&alice.token, &since);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the long-poll waits");
        let body = json!({alice.user_id.clone(): {alice.device_id.clone(): {"ciphertext": "wake up"}}});
        assert_eq!(send_to_device(&server, &bob, "w1", body).await.0, 200);
        // Far less than the sync's two-minute timeout: only a wake ends it in time.
        let woken = tokio::time::timeout(std::time::Duration::from_secs(30), waiting)
            .await
            .expect("the long-poll was woken by the message")
            .unwrap();
        assert_eq!(to_device_events(&woken)[0]["content"]["ciphertext"], "wake up", "{woken}");
        // A token whose to-device part this server never issued.
        let forged = format!("{}_tnot-a-cursor", next(&woken).split('_').next().unwrap());
        let path = format!("/_matrix/client/v3/sync?since={forged}&timeout=0");
        assert_error(&server.get(&path, Some(&alice.token)).await, 400, "M_INVALID_PARAM");
        let since = next(&woken);
        assert!(to_device_events(&sync(&server, &alice, Some(&since)).await).is_empty());

        // A device that logs in later is known at once to senders who sent to the user before.
        let (_, third) = server.login("alice", PW, json!({"device_id": "TABLET"})).await;
        let tablet = session_of(&third);
        let tablet_since = next(&sync(&server, &tablet, None).await);
        let body = json!({alice.user_id.clone(): {"TABLET": {"ciphertext": "for the new tablet"}}});
        assert_eq!(send_to_device(&server, &bob, "t6", body).await.0, 200);
        let tablet_sync = sync(&server, &tablet, Some(&tablet_since)).await;
        assert_eq!(to_device_events(&tablet_sync).len(), 1, "{tablet_sync}");

        // Deleting a device drops what waits for it.
        let body = json!({alice.user_id.clone(): {"PHONE": {"ciphertext": "lost with the phone"}}});
        assert_eq!(send_to_device(&server, &bob, "p1", body).await.0, 200);
        let (status, _) = server.request("POST", "/_matrix/client/v3/logout", Some(&phone.token), None).await;
        assert_eq!(status, 200);
        let (_, again) = server.login("alice", PW, json!({"device_id": "PHONE"})).await;
        let phone = session_of(&again);
        let fresh = sync(&server, &phone, None).await;
        assert!(to_device_events(&fresh).is_empty(), "{fresh}");
        server.stop().await;
    }

    async fn device_lists(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = shared_room(&server, &alice, &bob).await;
        let bob_since = next(&sync(&server, &bob, None).await);
        let alice_since = next(&sync(&server, &alice, None).await);

        // Alice's new device uploads keys: bob, who shares a room with her, is told; carol is not.
        let carol_since = next(&sync(&server, &carol, None).await);
        let (_, second) = server.login("alice", PW, json!({"device_id": "TABLET"})).await;
        let tablet = session_of(&second);
        let key = DeviceKey::new("TABLET");
        assert_eq!(upload(&server, &tablet, json!({"device_keys": key.device_keys(&tablet)})).await.0, 200);
        let update = sync(&server, &bob, Some(&bob_since)).await;
        assert_eq!(update["device_lists"]["changed"], json!([alice.user_id]), "{update}");
        let carol_update = sync(&server, &carol, Some(&carol_since)).await;
        assert!(carol_update["device_lists"]["changed"].as_array().is_none_or(Vec::is_empty), "{carol_update}");
        let (status, changes) = server.get(&format!("/_matrix/client/v3/keys/changes?from={bob_since}&to={}", next(&update)), Some(&bob.token)).await;
        assert_eq!(status, 200, "{changes}");
        assert_eq!(changes["changed"], json!([alice.user_id]));

        // Deleting the device is a change too.
        let bob_since = next(&update);
        assert_eq!(server.request("POST", "/_matrix/client/v3/logout", Some(&tablet.token), None).await.0, 200);
        let update = sync(&server, &bob, Some(&bob_since)).await;
        assert_eq!(update["device_lists"]["changed"], json!([alice.user_id]), "{update}");

        // Carol joins: alice must query her; bob leaves: alice no longer shares a room with him.
        let invite = format!("/_matrix/client/v3/rooms/{room}/invite");
        assert_eq!(server.post(&invite, Some(&alice.token), json!({"user_id": carol.user_id})).await.0, 200);
        assert_eq!(server.post(&format!("/_matrix/client/v3/rooms/{room}/join"), Some(&carol.token), json!({})).await.0, 200);
        assert_eq!(server.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), Some(&bob.token), json!({})).await.0, 200);
        let update = sync(&server, &alice, Some(&alice_since)).await;
        let changed = update["device_lists"]["changed"].as_array().unwrap();
        assert!(changed.contains(&json!(carol.user_id)), "{update}");
        assert_eq!(update["device_lists"]["left"], json!([bob.user_id]), "{update}");
        server.stop().await;
    }
}
