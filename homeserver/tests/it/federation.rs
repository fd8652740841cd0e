//! Federation between two Hearths, each with its own database and a federation listener that
//! speaks TLS on loopback (a certificate from a throwaway CA both trust), named
//! `127.0.0.1:PORT` as the spec allows without DNS.

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, OwnedEventId, OwnedServerName, RoomVersionId, ServerName,
    api::{
        OutgoingRequest, OutgoingRequestExt,
        federation::{
            authentication::{ServerSignatures, XMatrixSigningInput},
            event::{get_event, get_missing_events, get_room_state_ids},
            membership::{create_invite, create_join_event, prepare_join_event},
            query::get_profile_information,
            transactions::send_transaction_message,
        },
        path_builder::SinglePath,
    },
    signatures::Ed25519KeyPair,
};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::{
    common::{Db, Session, TestServer, create_room, enc, put_ok},
    federated_chat::Client,
    interop::free_port,
    tls::TestCa,
};

/// A Hearth that federates, and how to reach its federation listener.
pub(crate) struct Federating {
    pub(crate) server: TestServer,
    pub(crate) name: OwnedServerName,
    federation_base: String,
}

impl Federating {
    pub(crate) async fn start(db: Db, ca: &TestCa) -> Self {
        Self::start_with(db, ca, |_| {}).await
    }

    /// [`Federating::start`], with `tweak` applied to the configuration.
    pub(crate) async fn start_with(
        db: Db,
        ca: &TestCa,
        tweak: impl FnOnce(&mut homeserver::config::Config),
    ) -> Self {
        Self::start_named(db, ca, None, tweak).await
    }

    /// [`Federating::start_with`], named `name` (a name under `hearth.test`, which the test's
    /// DNS must lead to its listener) instead of its address.
    pub(crate) async fn start_named(
        db: Db,
        ca: &TestCa,
        name: Option<&str>,
        tweak: impl FnOnce(&mut homeserver::config::Config),
    ) -> Self {
        let port = free_port();
        let name = OwnedServerName::try_from(name.map_or_else(|| format!("127.0.0.1:{port}"), str::to_owned))
            .unwrap();
        let (certificate, private_key) = ca.server_files();
        let ca_file = ca.ca_file();
        let server_name = name.to_string();
        let server = TestServer::start_with(db, move |config| {
            config.server_name = server_name;
            config.listen.federation = format!("127.0.0.1:{port}");
            config.tls.certificate = certificate;
            config.tls.private_key = private_key;
            config.federation.extra_ca_file = ca_file;
            config.federation.allow_private_addresses = true;
            config.federation.old_signing_keys = vec![homeserver::config::OldSigningKey {
                key_id: "ed25519:retired".to_owned(),
                public_key: "l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ".to_owned(),
                expired_ts: 1_700_000_000_000,
            }];
            tweak(config);
        })
        .await;
        assert_eq!(server.server.federation_addr().map(|a| a.port()), Some(port));
        Self { server, name, federation_base: format!("https://127.0.0.1:{port}") }
    }

    pub(crate) async fn stop(self) {
        self.server.stop().await;
    }

    /// Stops this server, then starts it again on its database and federation address once
    /// `meanwhile` is done.
    pub(crate) async fn down_while<T>(self, meanwhile: impl Future<Output = T>) -> (Self, T) {
        let Self { server, name, federation_base } = self;
        let halted = server.halt().await;
        let done = meanwhile.await;
        (Self { server: halted.start().await, name, federation_base }, done)
    }

    /// Who this server is to the others: its name and signing key.
    pub(crate) fn signer(&self) -> Signer<'_> {
        Signer { name: &self.name, key: self.server.server.state.signing_key.key_pair() }
    }

    /// Sends `request` to `to`'s federation listener as this server; the status and body.
    pub(crate) async fn send<R>(&self, ca: &TestCa, to: &Federating, request: R) -> (u16, Value)
    where
        R: OutgoingRequest<Authentication = ServerSignatures, PathBuilder = SinglePath>,
    {
        self.signer().send(ca, to, request).await
    }

    /// Sends a request that ruma has no type for, signed with X-Matrix as this server.
    pub(crate) async fn send_raw(
        &self,
        ca: &TestCa,
        to: &Federating,
        method: &str,
        path: &str,
        body: Value,
    ) -> (u16, Value) {
        let mut signed = object(json!({
            "method": method, "uri": path, "origin": self.name, "destination": to.name, "content": body,
        }));
        let state = &self.server.server.state;
        ruma::signatures::sign_json(self.name.as_str(), state.signing_key.key_pair(), &mut signed).unwrap();
        let key_id = state.signing_key.key_id();
        let sig = signed["signatures"].as_object().unwrap()[self.name.as_str()].as_object().unwrap()
            [key_id.as_str()]
        .clone();
        let CanonicalJsonValue::String(sig) = sig else { panic!("a signature is a string") };
        let header = format!(
            "X-Matrix origin=\"{}\",destination=\"{}\",key=\"{key_id}\",sig=\"{sig}\"",
            self.name, to.name
        );
        let url = format!("{}{path}", to.federation_base);
        let response = ca
            .client()
            .request(method.parse().unwrap(), url)
            .header("Authorization", header)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Hashes and signs an event as this server; its id (room version 12) and JSON.
    pub(crate) fn sign(&self, event: CanonicalJsonObject) -> (OwnedEventId, CanonicalJsonObject) {
        self.signer().sign(event)
    }

    /// Puts a transaction of `pdus` to `to` as this server; the status and body.
    pub(crate) async fn transaction(
        &self,
        ca: &TestCa,
        to: &Federating,
        txn: &str,
        pdus: &[CanonicalJsonObject],
    ) -> (u16, Value) {
        self.signer().transaction(ca, to, txn, pdus).await
    }
}

/// An event of `room` to sign, following `prev` and authorised by `auth`.
pub(crate) fn draft(
    room: &str,
    sender: &str,
    (kind, state_key): (&str, Option<&str>),
    content: Value,
    prev: &[&str],
    auth: &[&str],
    depth: u64,
) -> CanonicalJsonObject {
    let mut event = json!({
        "room_id": room, "sender": sender, "type": kind, "content": content,
        "prev_events": prev, "auth_events": auth, "depth": depth,
        "origin_server_ts": 1_700_000_000_000u64 + depth,
    });
    if let Some(key) = state_key {
        event["state_key"] = json!(key);
    }
    object(event)
}

impl<'a> From<&'a Federating> for Signer<'a> {
    fn from(server: &'a Federating) -> Self {
        server.signer()
    }
}

/// A stand-in for another server: it publishes a key of its own, takes every transaction,
/// answering `{}` (without the `pdus` the spec asks for, as SyTest's servers answer), and
/// answers the GET requests the test set an answer for ([`StandIn::answer`]).
pub(crate) struct StandIn {
    pub(crate) name: OwnedServerName,
    pub(crate) port: u16,
    key: ::federation::signing_key::SigningKey,
    received: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    /// Path (decoded) → answer, and the paths asked for.
    answers: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Value>>>,
    /// (Host header, path) of each request.
    asked: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
    pub(crate) handle: actix_web::dev::ServerHandle,
}

impl StandIn {
    pub(crate) async fn start(ca: &TestCa) -> Self {
        Self::start_named(ca, None).await
    }

    /// [`StandIn::start`], named `name` instead of its address (see [`Federating::start_named`]).
    pub(crate) async fn start_named(ca: &TestCa, name: Option<&str>) -> Self {
        use actix_web::{App, HttpResponse, HttpServer, web};
        let key_file = std::env::temp_dir()
            .join(format!("hearth-stand-in-{}.key", homeserver::auth::tokens::random_token(10)));
        let key = ::federation::signing_key::SigningKey::load_or_generate(&key_file).unwrap();
        let _ = std::fs::remove_file(&key_file);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let name = OwnedServerName::try_from(name.map_or_else(|| format!("127.0.0.1:{port}"), str::to_owned))
            .unwrap();
        let document = ::federation::keys::own_key_document(&name, &key, &[], 4_000_000_000_000).unwrap();
        let document = CanonicalJsonValue::Object(document).to_string();
        let received: std::sync::Arc<std::sync::Mutex<Vec<Value>>> = Default::default();
        let taken = received.clone();
        let answers: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Value>>> =
            Default::default();
        let asked: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>> = Default::default();
        let (canned, asks) = (answers.clone(), asked.clone());
        let server = HttpServer::new(move || {
            let (document, taken) = (document.clone(), taken.clone());
            let (canned, asks) = (canned.clone(), asks.clone());
            App::new()
                .default_service(web::to(move |request: actix_web::HttpRequest| {
                    let path =
                        percent_encoding::percent_decode_str(request.path()).decode_utf8_lossy().into_owned();
                    let host =
                        request.headers().get("host").and_then(|host| host.to_str().ok()).unwrap_or_default();
                    asks.lock().unwrap().push((host.to_owned(), path.clone()));
                    let answer = canned.lock().unwrap().get(&path).cloned();
                    async move {
                        match answer {
                            Some(answer) => HttpResponse::Ok().json(answer),
                            None => HttpResponse::NotFound()
                                .json(json!({"errcode": "M_NOT_FOUND", "error": path})),
                        }
                    }
                }))
                .route(
                    "/_matrix/key/v2/server",
                    web::get().to(move || {
                        let document = document.clone();
                        async move { HttpResponse::Ok().content_type("application/json").body(document) }
                    }),
                )
                .route(
                    "/_matrix/federation/v1/send/{txn}",
                    web::put().to(move |body: web::Json<Value>| {
                        let taken = taken.clone();
                        async move {
                            taken
                                .lock()
                                .unwrap()
                                .extend(body["pdus"].as_array().cloned().unwrap_or_default());
                            HttpResponse::Ok().json(json!({}))
                        }
                    }),
                )
        })
        .workers(1)
        .keep_alive(actix_web::http::KeepAlive::Disabled)
        .disable_signals()
        .listen_rustls_0_23(listener, ca.server_config())
        .unwrap()
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self { name, port, key, received, answers, asked, handle }
    }

    pub(crate) fn signer(&self) -> Signer<'_> {
        Signer { name: &self.name, key: self.key.key_pair() }
    }

    /// Answers GET `path` (not percent-encoded) with `answer` from now on.
    pub(crate) fn answer(&self, path: &str, answer: Value) {
        self.answers.lock().unwrap().insert(path.to_owned(), answer);
    }

    /// The paths it was asked for besides transactions and its key, decoded, in order.
    pub(crate) fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().iter().map(|(_, path)| path.clone()).collect()
    }

    /// The Host headers of those requests, in order.
    pub(crate) fn hosts(&self) -> Vec<String> {
        self.asked.lock().unwrap().iter().map(|(host, _)| host.clone()).collect()
    }

    /// The types of the events it was sent, in the order they came.
    pub(crate) fn received_types(&self) -> Vec<String> {
        let received = self.received.lock().unwrap();
        received.iter().filter_map(|pdu| pdu["type"].as_str().map(str::to_owned)).collect()
    }

    /// The bodies of the `m.room.message` events it was sent, in the order they came.
    pub(crate) fn bodies(&self) -> Vec<String> {
        let received = self.received.lock().unwrap();
        received.iter().filter_map(|pdu| pdu["content"]["body"].as_str().map(str::to_owned)).collect()
    }
}

/// A server name and its signing key: a Hearth's, or a stand-in's the test made.
#[derive(Clone, Copy)]
pub(crate) struct Signer<'a> {
    pub(crate) name: &'a ServerName,
    pub(crate) key: &'a Ed25519KeyPair,
}

impl Signer<'_> {
    /// Sends `request` to `to`'s federation listener as this server; the status and body.
    pub(crate) async fn send<R>(&self, ca: &TestCa, to: &Federating, request: R) -> (u16, Value)
    where
        R: OutgoingRequest<Authentication = ServerSignatures, PathBuilder = SinglePath>,
    {
        let signing = XMatrixSigningInput::new(self.name.to_owned(), to.name.clone(), self.key);
        let request = request.try_into_http_request::<Vec<u8>>(&to.federation_base, signing, ()).unwrap();
        let response = ca.client().execute(reqwest::Request::try_from(request).unwrap()).await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Puts a transaction of `pdus` to `to` as this server; the status and body.
    pub(crate) async fn transaction(
        &self,
        ca: &TestCa,
        to: &Federating,
        txn: &str,
        pdus: &[CanonicalJsonObject],
    ) -> (u16, Value) {
        self.transaction_with(ca, to, txn, pdus, &[]).await
    }

    /// [`Signer::transaction`] with `edus` too.
    pub(crate) async fn transaction_with(
        &self,
        ca: &TestCa,
        to: &Federating,
        txn: &str,
        pdus: &[CanonicalJsonObject],
        edus: &[Value],
    ) -> (u16, Value) {
        let mut request = send_transaction_message::v1::Request::new(
            txn.into(),
            self.name.to_owned(),
            ruma::MilliSecondsSinceUnixEpoch::now(),
        );
        request.pdus = pdus
            .iter()
            .map(|pdu| RawValue::from_string(CanonicalJsonValue::Object(pdu.clone()).to_string()).unwrap())
            .collect();
        request.edus = edus
            .iter()
            .map(|edu| ruma::serde::Raw::from_json(RawValue::from_string(edu.to_string()).unwrap()))
            .collect();
        self.send(ca, to, request).await
    }

    /// Hashes and signs an event as this server; its id (room version 12) and JSON.
    pub(crate) fn sign(&self, mut event: CanonicalJsonObject) -> (OwnedEventId, CanonicalJsonObject) {
        let rules = RoomVersionId::V12.rules().unwrap();
        ruma::signatures::hash_and_sign_event(self.name.as_str(), self.key, &mut event, &rules.redaction)
            .unwrap();
        let id = ::federation::pdu::event_id_of(&event, &RoomVersionId::V12).unwrap();
        (id, event)
    }
}

/// Canonical JSON from a `json!` value.
pub(crate) fn object(value: Value) -> CanonicalJsonObject {
    serde_json::from_value(value).unwrap()
}

/// A profile query from `from` to `to` about `user`, signed by `from` (as `origin`, with `key`),
/// changed by `tamper` after signing; the status and body of `to`'s answer.
async fn profile_query(
    ca: &TestCa,
    from: &Federating,
    to: &Federating,
    user: &str,
    sign: impl FnOnce(&ServerName, &ServerName) -> (OwnedServerName, OwnedServerName),
    tamper: impl FnOnce(&mut http::Request<Vec<u8>>),
) -> (u16, Value) {
    let (origin, destination) = sign(&from.name, &to.name);
    let key = from.server.server.state.signing_key.key_pair();
    let request = get_profile_information::v1::Request::new(user.try_into().unwrap());
    let mut request = request
        .try_into_http_request::<Vec<u8>>(
            &to.federation_base,
            XMatrixSigningInput::new(origin, destination, key),
            (),
        )
        .unwrap();
    tamper(&mut request);
    let response = ca.client().execute(reqwest::Request::try_from(request).unwrap()).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn as_is(origin: &ServerName, destination: &ServerName) -> (OwnedServerName, OwnedServerName) {
    (origin.to_owned(), destination.to_owned())
}

fn unchanged(_: &mut http::Request<Vec<u8>>) {}

async fn set_name(server: &TestServer, who: &Session, name: &str) {
    let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&who.user_id));
    put_ok(server, who, &path, json!({"displayname": name})).await;
}

crate::on_both_backends! {
    async fn users_aliases_and_public_rooms_of_another_server_are_found_through_signed_requests(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let bob = b.server.register("bob", "a long password").await;
        set_name(&b.server, &bob, "Bob of B").await;
        let room = create_room(
            &b.server,
            &bob,
            json!({"room_alias_name": "lobby", "visibility": "public", "name": "The Lobby"}),
        )
        .await;

        let (status, profile) =
            a.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&bob.user_id)), Some(&alice.token)).await;
        assert_eq!(status, 200, "{profile}");
        assert_eq!(profile["displayname"], "Bob of B");
        let (status, name) = a
            .server
            .get(&format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.user_id)), Some(&alice.token))
            .await;
        assert_eq!((status, &name["displayname"]), (200, &json!("Bob of B")));
        let nobody = format!("@nobody:{}", b.name);
        let (status, missing) =
            a.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&nobody)), Some(&alice.token)).await;
        assert_eq!((status, missing["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{missing}");

        let alias = format!("#lobby:{}", b.name);
        let (status, found) =
            a.server.get(&format!("/_matrix/client/v3/directory/room/{}", enc(&alias)), Some(&alice.token)).await;
        assert_eq!(status, 200, "{found}");
        assert_eq!(found["room_id"], room);
        assert_eq!(found["servers"], json!([b.name.to_string()]));

        // B's public rooms, browsed from A (A asks B over federation, GET and POST).
        let directory = format!("/_matrix/client/v3/publicRooms?server={}", enc(b.name.as_str()));
        let (status, listed) = a.server.get(&directory, Some(&alice.token)).await;
        assert_eq!(status, 200, "{listed}");
        assert_eq!(listed["chunk"].as_array().map(Vec::len), Some(1), "{listed}");
        assert_eq!(listed["chunk"][0]["room_id"], room);
        assert_eq!(listed["chunk"][0]["name"], "The Lobby");
        assert_eq!(listed["chunk"][0]["canonical_alias"], alias);
        assert_eq!(listed["chunk"][0]["num_joined_members"], 1);
        for (term, count) in [("lobby", 1), ("nowhere", 0)] {
            let filter = json!({"filter": {"generic_search_term": term}});
            let (status, searched) = a.server.post(&directory, Some(&alice.token), filter).await;
            assert_eq!(status, 200, "{searched}");
            assert_eq!(searched["chunk"].as_array().map(Vec::len), Some(count), "{term}: {searched}");
        }

        // B checked A's signatures with A's key, which it fetched from A and kept.
        let kept = b.server.server.state.store.server_keys(a.name.as_str()).await.unwrap();
        let key_id = a.server.server.state.signing_key.key_id();
        assert!(kept.iter().any(|k| k.key_id == key_id && k.expired_ts.is_none()), "{kept:?}");
        assert!(kept.iter().any(|k| k.key_id == "ed25519:retired" && k.expired_ts == Some(1_700_000_000_000)));
        a.stop().await;
        b.stop().await;
    }

    async fn the_key_server_publishes_a_signed_document_and_notarises_other_servers(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        let http = ca.client();
        let own: ruma::CanonicalJsonObject = http
            .get(format!("{}/_matrix/key/v2/server", a.federation_base))
            .send().await.unwrap().json().await.unwrap();
        let keys = ::federation::keys::verify_key_document(&own, &a.name).unwrap();
        let by_id: ruma::CanonicalJsonObject = http
            .get(format!("{}/_matrix/key/v2/server/ed25519%3Aanything", a.federation_base))
            .send().await.unwrap().json().await.unwrap();
        assert_eq!(::federation::keys::verify_key_document(&by_id, &a.name).unwrap().verify_keys, keys.verify_keys);
        let signing = &a.server.server.state.signing_key;
        assert_eq!(keys.verify_keys[&signing.key_id()], signing.public_key_base64());
        assert!(keys.old_verify_keys.contains_key("ed25519:retired"));
        let now = u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap();
        assert!(keys.valid_until_ts > now, "valid_until_ts {} is not in the future", keys.valid_until_ts);

        // B vouches for A's keys: A's document as A signed it, with B's signature added.
        for answer in [
            http.get(format!("{}/_matrix/key/v2/query/{}", b.federation_base, a.name)).send().await.unwrap(),
            http.post(format!("{}/_matrix/key/v2/query", b.federation_base))
                .json(&json!({"server_keys": {a.name.as_str(): {}}})).send().await.unwrap(),
        ] {
            let body: Value = answer.json().await.unwrap();
            let documents = body["server_keys"].as_array().unwrap();
            assert_eq!(documents.len(), 1, "{body}");
            let document: ruma::CanonicalJsonObject = serde_json::from_value(documents[0].clone()).unwrap();
            assert_eq!(::federation::keys::verify_key_document(&document, &a.name).unwrap().verify_keys, keys.verify_keys);
            let b_key = b.server.server.state.signing_key.key_id();
            assert!(documents[0]["signatures"][b.name.as_str()][&b_key].is_string(), "{body}");
        }
        let (status, version) = {
            let answer = http.get(format!("{}/_matrix/federation/v1/version", a.federation_base)).send().await.unwrap();
            (answer.status().as_u16(), answer.json::<Value>().await.unwrap())
        };
        assert_eq!((status, &version["server"]["name"]), (200, &json!("Hearth")));
        a.stop().await;
        b.stop().await;
    }

    async fn the_keys_of_a_server_that_does_not_answer_come_from_a_notary_whose_own_key_checks_out(db: Db) {
        let ca = TestCa::new();
        let notary = Federating::start(db, &ca).await;
        let stand_in = StandIn::start(&ca).await;
        // The notary learns the stand-in's keys while the stand-in answers; then it answers nobody.
        let answer = ca.client().get(format!("{}/_matrix/key/v2/query/{}", notary.federation_base, stand_in.name)).send().await.unwrap();
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["server_keys"].as_array().map(Vec::len), Some(1), "{body}");
        stand_in.handle.stop(true).await;

        let key = &notary.server.server.state.signing_key;
        let notary_with = |public_key: String| homeserver::config::TrustedKeyServer {
            server_name: notary.name.to_string(),
            verify_keys: std::collections::BTreeMap::from([(key.key_id(), public_key)]),
        };
        let trusting = notary_with(key.public_key_base64());
        let a = Federating::start_with(db, &ca, |c| c.federation.trusted_key_servers = vec![trusting]).await;
        // B holds a key for the notary that is not the notary's.
        let mistaken = notary_with("l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ".to_owned());
        let b = Federating::start_with(db, &ca, |c| c.federation.trusted_key_servers = vec![mistaken]).await;
        // C names no key for the notary: it takes the keys the notary publishes.
        let unkeyed = homeserver::config::TrustedKeyServer { server_name: notary.name.to_string(), verify_keys: Default::default() };
        let c = Federating::start_with(db, &ca, |c| c.federation.trusted_key_servers = vec![unkeyed]).await;
        let (alice, bob) = (a.server.register("alice", "a long password").await, b.server.register("bob", "a long password").await);
        let carol = c.server.register("carol", "a long password").await;
        let query = |user: &str| get_profile_information::v1::Request::new(user.try_into().unwrap());

        let (status, body) = stand_in.signer().send(&ca, &a, query(&alice.user_id)).await;
        assert_eq!(status, 200, "A takes the stand-in's key on the notary's word: {body}");
        let kept = a.server.server.state.store.server_keys(stand_in.name.as_str()).await.unwrap();
        assert!(kept.iter().any(|k| k.public_key == stand_in.key.public_key_base64()), "{kept:?}");
        let (status, body) = stand_in.signer().send(&ca, &b, query(&bob.user_id)).await;
        assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "B cannot check the notary's word: {body}");
        let (status, body) = stand_in.signer().send(&ca, &c, query(&carol.user_id)).await;
        assert_eq!(status, 200, "C checks the notary's word with the keys the notary publishes: {body}");
        for server in [a, b, c, notary] {
            server.stop().await;
        }
    }

    async fn requests_that_are_not_properly_signed_are_refused(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        let bob = b.server.register("bob", "a long password").await;
        let user = bob.user_id.as_str();

        // A correct request is answered: the refusals below are for what each changes.
        let (status, body) = profile_query(&ca, &a, &b, user, as_is, unchanged).await;
        assert_eq!(status, 200, "{body}");

        let refused = |(status, body): (u16, Value), what: &str| {
            assert_eq!((status, body["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{what}: {body}");
        };
        let strip = |request: &mut http::Request<Vec<u8>>| {
            request.headers_mut().remove(http::header::AUTHORIZATION);
        };
        refused(profile_query(&ca, &a, &b, user, as_is, strip).await, "no Authorization header");
        let without_sig = |request: &mut http::Request<Vec<u8>>| {
            let header = request.headers()[http::header::AUTHORIZATION].to_str().unwrap().to_owned();
            let cut = header[..header.find(",sig=").unwrap()].to_owned();
            request.headers_mut().insert(http::header::AUTHORIZATION, cut.parse().unwrap());
        };
        refused(profile_query(&ca, &a, &b, user, as_is, without_sig).await, "a header without sig");
        let elsewhere = |origin: &ServerName, _: &ServerName| {
            (origin.to_owned(), OwnedServerName::try_from("elsewhere.example").unwrap())
        };
        refused(profile_query(&ca, &a, &b, user, elsewhere, unchanged).await, "for another destination");
        let other_uri = |request: &mut http::Request<Vec<u8>>| {
            *request.uri_mut() = request.uri().to_string().replace("%40bob", "%40bobby").parse().unwrap();
        };
        refused(profile_query(&ca, &a, &b, user, as_is, other_uri).await, "a URI other than the one signed");
        let unknown_key = |request: &mut http::Request<Vec<u8>>| {
            let header = request.headers()[http::header::AUTHORIZATION].to_str().unwrap().to_owned();
            let start = header.find("key=").unwrap();
            let end = start + header[start..].find(',').unwrap();
            let changed = format!("{}key=\"ed25519:unknown\"{}", &header[..start], &header[end..]);
            request.headers_mut().insert(http::header::AUTHORIZATION, changed.parse().unwrap());
        };
        refused(profile_query(&ca, &a, &b, user, as_is, unknown_key).await, "a key the origin does not use");
        // Signed by A's key while claiming to come from B itself.
        let impostor = |_: &ServerName, destination: &ServerName| (destination.to_owned(), destination.to_owned());
        refused(profile_query(&ca, &a, &b, user, impostor, unchanged).await, "another server's name");
        // A body that is not canonical JSON (a float) could not have been signed: malformed.
        let float_body = |request: &mut http::Request<Vec<u8>>| *request.body_mut() = br#"{"x": 1.5}"#.to_vec();
        let (status, body) = profile_query(&ca, &a, &b, user, as_is, float_body).await;
        assert_eq!((status, body["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{body}");

        // Still serving.
        let (status, _) = profile_query(&ca, &a, &b, user, as_is, unchanged).await;
        assert_eq!(status, 200);
        a.stop().await;
        b.stop().await;
    }

    /// Two Hearths host and join each other's rooms (by alias, by invite), read the history from
    /// before the join, chat both ways, reject invites, and kicks, bans, power levels and
    /// concurrent state changes hold the same on both (the scenarios of
    /// [`crate::federated_chat`]).
    async fn two_hearths_host_and_join_each_others_rooms_with_history_invites_kicks_bans_and_converging_state(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let bob = b.server.register("bob", "a long password").await;
        let (on_a, on_b) = (Client::Hearth(&a.server, &alice.token), Client::Hearth(&b.server, &bob.token));
        let context = || format!("{db:?}");
        crate::federated_chat::chat(&on_a, &a.name, &on_b, "hall", &context).await;
        crate::federated_chat::chat(&on_b, &b.name, &on_a, "plaza", &context).await;
        crate::federated_chat::invite_and_ban(&on_a, &on_b, &bob.user_id, &context).await;
        crate::federated_chat::invite_and_ban(&on_b, &on_a, &alice.user_id, &context).await;
        crate::federated_chat::invite_rejected(&on_a, &on_b, &bob.user_id, &context).await;
        crate::federated_chat::invite_rejected(&on_b, &on_a, &alice.user_id, &context).await;
        a.stop().await;
        b.stop().await;
    }

    /// matrix-nio's users on two Hearths share a room ([`crate::interop::run_federation_harness`]):
    /// joined by alias and by invite, messages in order both ways, name, power levels and topic
    /// set on either side, history read by a late joiner, a kick and a ban held on both.
    async fn matrix_nio_users_of_two_hearths_share_a_room(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        crate::interop::run_federation_harness(&a.server.base, &b.server.base, &ca.ca_file(), &|| format!("{db:?}"))
            .await;
        a.stop().await;
        b.stop().await;
    }

    /// A join another server cannot make is refused as the spec says: this server answers a
    /// `make_join` naming no version the room has with 400 `M_INCOMPATIBLE_ROOM_VERSION` and the
    /// room's version, and a client joining through a server that refuses so (here a stand-in
    /// for a server with a room version Hearth lacks) gets that refusal, not a 502.
    async fn a_join_across_room_versions_is_refused_with_the_rooms_version(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(Db::Sqlite, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let room = create_room(&a.server, &alice, json!({"preset": "public_chat", "room_version": "12"})).await;
        let mut make = prepare_join_event::v1::Request::new(
            room.as_str().try_into().unwrap(),
            format!("@carol:{}", b.name).as_str().try_into().unwrap(),
        );
        make.ver = vec![RoomVersionId::V1, RoomVersionId::V2];
        let (status, refused) = b.send(&ca, &a, make).await;
        assert_eq!((status, refused["errcode"].as_str()), (400, Some("M_INCOMPATIBLE_ROOM_VERSION")), "{refused}");
        assert_eq!(refused["room_version"], "12");

        let other = actix_web::HttpServer::new(|| {
            actix_web::App::new().default_service(actix_web::web::to(|| async {
                actix_web::HttpResponse::BadRequest().json(json!({
                    "errcode": "M_INCOMPATIBLE_ROOM_VERSION", "error": "an unknown version", "room_version": "x-future",
                }))
            }))
        })
        .workers(1)
        .keep_alive(actix_web::http::KeepAlive::Disabled)
        .disable_signals()
        .bind_rustls_0_23("127.0.0.1:0", ca.server_config())
        .unwrap();
        let other_name = format!("127.0.0.1:{}", other.addrs()[0].port());
        let other = other.run();
        let handle = other.handle();
        tokio::spawn(other);
        let bob = b.server.register("bob", "a long password").await;
        let path = format!("/_matrix/client/v3/join/{}?server_name={}", enc(&format!("!future:{other_name}")), enc(&other_name));
        let (status, refused) = b.server.post(&path, Some(&bob.token), json!({})).await;
        assert_eq!((status, refused["errcode"].as_str()), (400, Some("M_INCOMPATIBLE_ROOM_VERSION")), "{refused}");
        assert_eq!(refused["room_version"], "x-future");
        handle.stop(false).await;
        a.stop().await;
        b.stop().await;
    }

    /// A server that answers a transaction with a success whose body is not the spec's (`{}`,
    /// as SyTest's servers do) has it: the next events go to it at once, not after the first is
    /// sent again and again.
    async fn a_transaction_answered_with_an_unexpected_success_is_not_sent_again(db: Db) {
        let ca = TestCa::new();
        let a = Federating::start(db, &ca).await;
        let stand_in = StandIn::start(&ca).await;
        let alice = a.server.register("alice", "a long password").await;
        let room = create_room(&a.server, &alice, json!({"preset": "public_chat", "room_version": "12"})).await;
        join_by_hand(&ca, stand_in.signer(), &a, &room, &format!("@dora:{}", stand_in.name)).await;
        let said = ["first", "second", "third"];
        let started = std::time::Instant::now();
        for (n, body) in said.iter().enumerate() {
            crate::common::send_text(&a.server, &alice, &room, &format!("u{n}"), body).await;
            // One at a time, so that each goes in a transaction of its own.
            while !stand_in.bodies().contains(&(*body).to_owned()) {
                assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", stand_in.bodies());
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        assert_eq!(stand_in.bodies(), said, "each sent once, in order");
        stand_in.handle.stop(false).await;
        a.stop().await;
    }

    /// The deprecated v1 forms of `send_join` and `send_leave`, which older servers still call,
    /// take the event as v2 does (an unsigned one refused as forbidden) and answer `[200, body]`.
    async fn the_v1_send_join_and_send_leave_answer_as_v1_did(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(Db::Sqlite, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let room = create_room(&a.server, &alice, json!({"preset": "public_chat", "room_version": "12"})).await;
        let carol = format!("@carol:{}", b.name);
        let sign_template = |made: &Value| {
            let mut template = object(made["event"].clone());
            template.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(ruma::Int::from(1_700_000_000)));
            b.sign(template)
        };
        let mut make = prepare_join_event::v1::Request::new(room.as_str().try_into().unwrap(), carol.as_str().try_into().unwrap());
        make.ver = vec![RoomVersionId::V12];
        let (status, made) = b.send(&ca, &a, make).await;
        assert_eq!(status, 200, "{made}");
        let (join, join_json) = sign_template(&made);
        let path = format!("/_matrix/federation/v1/send_join/{}/{}", enc(&room), enc(join.as_str()));
        // Unsigned, the join is not the joining server's: refused as forbidden.
        let mut unsigned = join_json.clone();
        unsigned.remove("signatures");
        let (status, refused) = b.send_raw(&ca, &a, "PUT", &path, serde_json::to_value(&unsigned).unwrap()).await;
        assert_eq!((status, refused["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{refused}");
        let (status, joined) = b.send_raw(&ca, &a, "PUT", &path, serde_json::to_value(&join_json).unwrap()).await;
        assert_eq!((status, &joined[0]), (200, &json!(200)), "{joined}");
        assert!(joined[1]["state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"), "{joined}");
        assert!(!joined[1]["auth_chain"].as_array().unwrap().is_empty(), "{joined}");
        let (_, members) = a.server
            .get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), Some(&alice.token)).await;
        assert!(members["joined"].get(&carol).is_some(), "{members}");

        let make = ruma::api::federation::membership::prepare_leave_event::v1::Request::new(
            room.as_str().try_into().unwrap(), carol.as_str().try_into().unwrap());
        let (status, made) = b.send(&ca, &a, make).await;
        assert_eq!(status, 200, "{made}");
        let (leave, leave_json) = sign_template(&made);
        let path = format!("/_matrix/federation/v1/send_leave/{}/{}", enc(&room), enc(leave.as_str()));
        let (status, left) = b.send_raw(&ca, &a, "PUT", &path, serde_json::to_value(&leave_json).unwrap()).await;
        assert_eq!((status, &left), (200, &json!([200, {}])), "{left}");
        let (_, members) = a.server
            .get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), Some(&alice.token)).await;
        assert!(members["joined"].get(&carol).is_none(), "{members}");
        // Unsigned, it is refused as any federation request is.
        let unsigned = ca.client().put(format!("{}{path}", a.federation_base)).json(&leave_json).send().await.unwrap();
        assert_eq!(unsigned.status().as_u16(), 401);
        a.stop().await;
        b.stop().await;
    }

    /// Events from another server are taken only when signed by the sender's server, within
    /// the auth rules and the size limit, in transactions of at most 50 PDUs, each transaction
    /// once; an event whose content no longer matches its hash is kept redacted; a redaction
    /// removes what its sender may redact only. Nothing refused is stored, and the server keeps
    /// serving.
    async fn events_from_another_server_are_checked_and_bad_ones_refused(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(Db::Sqlite, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let room = create_room(&a.server, &alice, json!({"preset": "public_chat", "room_version": "12"})).await;
        let carol = format!("@carol:{}", b.name);
        let (join, power) = join_by_hand(&ca, &b, &a, &room, &carol).await;
        let (_, members) = a.server
            .get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), Some(&alice.token)).await;
        assert!(members["joined"].get(&carol).is_some(), "{members}");

        let mut depth = 10;
        let mut event = |sender: &str, kind: &str, state_key: Option<&str>, content: Value| {
            depth += 1;
            draft(&room, sender, (kind, state_key), content, &[&join], &[&power, &join], depth)
        };
        let text = |body: &str| json!({"msgtype": "m.text", "body": body});

        // A good one, in a transaction that is then sent again with other contents.
        let (good, good_json) = b.sign(event(&carol, "m.room.message", None, text("hello from b")));
        let (status, answer) = b.transaction(&ca, &a, "t1", std::slice::from_ref(&good_json)).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["pdus"], json!({good.as_str(): {}}));
        let seen = readable(&a.server, &alice, &room, good.as_str()).await.expect("the good event is stored");
        assert_eq!(seen["content"]["body"], "hello from b");
        let (replayed, replayed_json) = b.sign(event(&carol, "m.room.message", None, text("sneaked in")));
        let (status, again) = b.transaction(&ca, &a, "t1", &[replayed_json]).await;
        assert_eq!((status, &again), (200, &answer), "a replayed transaction is answered as the first");
        assert!(readable(&a.server, &alice, &room, replayed.as_str()).await.is_none());

        let refused = |answer: &Value, id: &OwnedEventId| {
            assert!(answer["pdus"][id.as_str()]["error"].is_string(), "{id} was not refused: {answer}");
        };
        // A forged signature: signed, then the signature swapped for another event's.
        let (forged, mut forged_json) = b.sign(event(&carol, "m.room.message", None, text("forged")));
        let (_, other) = b.sign(event(&carol, "m.room.message", None, text("other")));
        forged_json.insert("signatures".into(), other["signatures"].clone());
        // Claiming a sender of A while signed by B only.
        let (impostor, impostor_json) =
            b.sign(event(alice.user_id.as_str(), "m.room.message", None, text("I am alice")));
        // Power B's user does not have.
        let (coup, coup_json) = b.sign(event(
            &carol,
            "m.room.power_levels",
            Some(""),
            json!({"users": {carol.clone(): 100}}),
        ));
        // Larger than a PDU may be (grown after signing: a signer refuses to sign it).
        let (huge, mut huge_json) = b.sign(event(&carol, "m.room.message", None, text("small")));
        huge_json.insert("content".into(), CanonicalJsonValue::Object(object(text(&"x".repeat(70_000)))));
        // Altered after signing: the hash no longer matches, so it is kept redacted.
        let (altered, mut altered_json) = b.sign(event(&carol, "m.room.message", None, text("original")));
        altered_json.insert("content".into(), CanonicalJsonValue::Object(object(text("altered"))));
        let pdus = [forged_json, impostor_json, coup_json, huge_json, altered_json];
        let (status, answer) = b.transaction(&ca, &a, "t2", &pdus).await;
        assert_eq!(status, 200, "{answer}");
        for id in [&forged, &impostor, &huge] {
            refused(&answer, id);
        }
        // Handled, the auth rules rejecting it: the empty result, as Synapse answers.
        assert_eq!(answer["pdus"][coup.as_str()], json!({}), "{answer}");
        for id in [&forged, &impostor, &coup, &huge] {
            assert!(readable(&a.server, &alice, &room, id.as_str()).await.is_none(), "{id} was stored");
        }
        assert_eq!(answer["pdus"][altered.as_str()], json!({}), "{answer}");
        let kept = readable(&a.server, &alice, &room, altered.as_str()).await.expect("kept redacted");
        assert_eq!(kept["content"], json!({}), "{kept}");

        // More than 50 PDUs in one transaction.
        let many: Vec<CanonicalJsonObject> = (0..51).map(|_| good_json.clone()).collect();
        let (status, answer) = b.transaction(&ca, &a, "t3", &many).await;
        assert_eq!((status, answer["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{answer}");

        // Still serving both ways.
        let still_here = crate::common::send_text(&a.server, &alice, &room, "a1", "still here").await;
        let (later, later_json) = b.sign(event(&carol, "m.room.message", None, text("still here too")));
        let (status, answer) = b.transaction(&ca, &a, "t4", &[later_json]).await;
        assert_eq!((status, &answer["pdus"][later.as_str()]), (200, &json!({})), "{answer}");

        // A transaction larger than a client's request may be (20 PDUs of 60 KB) is read whole.
        let big: Vec<(OwnedEventId, CanonicalJsonObject)> =
            (0..20).map(|i| b.sign(event(&carol, "m.room.message", None, text(&format!("{i}{}", "y".repeat(60_000)))))).collect();
        let pdus: Vec<CanonicalJsonObject> = big.iter().map(|(_, json)| json.clone()).collect();
        let (status, answer) = b.transaction(&ca, &a, "t6", &pdus).await;
        assert_eq!(status, 200, "{answer}");
        assert!(big.iter().all(|(id, _)| answer["pdus"][id.as_str()] == json!({})), "{answer}");

        // What B may ask of the room it is in: the state at an event, an event, the events
        // between two.
        let room_id: ruma::OwnedRoomId = room.as_str().try_into().unwrap();
        let (status, ids) =
            b.send(&ca, &a, get_room_state_ids::v1::Request::new(good.clone(), room_id.clone())).await;
        assert_eq!(status, 200, "{ids}");
        for id in [&join, &power] {
            assert!(ids["pdu_ids"].as_array().unwrap().contains(&json!(id)), "{id} not in {ids}");
        }
        assert!(!ids["auth_chain_ids"].as_array().unwrap().is_empty(), "{ids}");
        let (status, fetched) = b.send(&ca, &a, get_event::v1::Request::new(good.clone())).await;
        assert_eq!((status, &fetched["pdus"][0]["content"]["body"]), (200, &json!("hello from b")), "{fetched}");
        let mut missing = get_missing_events::v1::Request::new(
            room_id.clone(),
            vec![join.as_str().try_into().unwrap()],
            vec![still_here.as_str().try_into().unwrap()],
        );
        missing.limit = 10u32.into();
        let (status, between) = b.send(&ca, &a, missing).await;
        assert_eq!(status, 200, "{between}");
        // What alice's message follows, back to the join: B's good event among them.
        assert!(between["events"].as_array().unwrap().iter().any(|e| e["content"]["body"] == "hello from b"), "{between}");

        // Carol takes back her own message (a redaction from its sender's server applies); her
        // redaction of alice's is taken but removes nothing: she lacks the power to redact others'.
        let (own, own_json) = b.sign(event(&carol, "m.room.redaction", None, json!({"redacts": good})));
        let (theirs, theirs_json) = b.sign(event(&carol, "m.room.redaction", None, json!({"redacts": still_here})));
        let (status, answer) = b.transaction(&ca, &a, "t7", &[own_json, theirs_json]).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["pdus"], json!({own.as_str(): {}, theirs.as_str(): {}}), "{answer}");
        let taken_back = readable(&a.server, &alice, &room, good.as_str()).await.expect("still there, redacted");
        assert_eq!(taken_back["content"], json!({}), "{taken_back}");
        let untouched = readable(&a.server, &alice, &room, &still_here).await.expect("alice's message");
        assert_eq!(untouched["content"]["body"], "still here", "{untouched}");
        // One naming an event of another room is rejected, and that event stays as it was.
        let elsewhere = create_room(&a.server, &alice, json!({"preset": "public_chat"})).await;
        let other_room = crate::common::send_text(&a.server, &alice, &elsewhere, "o1", "in another room").await;
        let (across, across_json) = b.sign(event(&carol, "m.room.redaction", None, json!({"redacts": other_room})));
        let (status, answer) = b.transaction(&ca, &a, "t8", &[across_json]).await;
        assert_eq!((status, &answer["pdus"][across.as_str()]), (200, &json!({})), "{answer}");
        assert!(readable(&a.server, &alice, &room, across.as_str()).await.is_none(), "the redaction was taken");
        let kept = readable(&a.server, &alice, &elsewhere, &other_room).await.expect("the other room's message");
        assert_eq!(kept["content"]["body"], "in another room", "{kept}");

        // Once the room's server ACL denies B (an IP literal), B's events are refused and B may
        // not read the room.
        crate::common::put_state(
            &a.server,
            &alice,
            &room,
            "m.room.server_acl",
            "",
            json!({"allow": ["*"], "allow_ip_literals": false}),
        )
        .await;
        let (denied, denied_json) = b.sign(event(&carol, "m.room.message", None, text("after the ACL")));
        let (status, answer) = b.transaction(&ca, &a, "t5", &[denied_json]).await;
        assert_eq!(status, 200, "{answer}");
        refused(&answer, &denied);
        assert!(readable(&a.server, &alice, &room, denied.as_str()).await.is_none());
        let (status, ids) =
            b.send(&ca, &a, get_room_state_ids::v1::Request::new(good.clone(), room_id.clone())).await;
        assert_eq!((status, ids["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{ids}");
        // Nor invite into it: refused before anything is said of the invitee.
        let nobody = format!("@nobody:{}", a.name);
        let (invite, invite_json) = b.sign(event(&carol, "m.room.member", Some(&nobody), json!({"membership": "invite"})));
        let raw = RawValue::from_string(CanonicalJsonValue::Object(invite_json).to_string()).unwrap();
        let request = create_invite::v2::Request::new(room_id, invite, RoomVersionId::V12, raw, vec![]);
        let (status, answer) = b.send(&ca, &a, request).await;
        assert_eq!((status, answer["errcode"].as_str()), (403, Some("M_FORBIDDEN")), "{answer}");
        a.stop().await;
        b.stop().await;
    }

    /// An event the auth rules reject is answered as handled and kept out of sight: not
    /// readable, no state at it, the room's state unchanged, refused when sent again, and an
    /// event it authorises rejected too; an event that follows it is taken all the same.
    async fn rejected_events_are_kept_out_of_sight_but_later_events_may_follow_them(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(Db::Sqlite, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let room = create_room(&a.server, &alice, json!({"preset": "public_chat", "room_version": "12", "topic": "alice's"})).await;
        let carol = format!("@carol:{}", b.name);
        let (join, power) = join_by_hand(&ca, &b, &a, &room, &carol).await;
        let stranger = format!("@stranger:{}", b.name);
        let text = |body: &str| json!({"msgtype": "m.text", "body": body});
        // From a user of B who is not in the room: rejected.
        let (rejected, rejected_json) =
            b.sign(draft(&room, &stranger, ("m.room.message", None), text("not a member"), &[&join], &[&power], 11));
        let (rejected_topic, rejected_topic_json) = b.sign(draft(
            &room, &stranger, ("m.room.topic", Some("")), json!({"topic": "the stranger's"}), &[rejected.as_str()], &[&power], 12,
        ));
        let (status, answer) = b.transaction(&ca, &a, "r1", &[rejected_json.clone(), rejected_topic_json]).await;
        assert_eq!((status, &answer["pdus"]), (200, &json!({rejected.as_str(): {}, rejected_topic.as_str(): {}})), "{answer}");
        for id in [&rejected, &rejected_topic] {
            assert!(readable(&a.server, &alice, &room, id.as_str()).await.is_none(), "{id} is readable");
            let room_id: ruma::OwnedRoomId = room.as_str().try_into().unwrap();
            let (status, answer) = b.send(&ca, &a, get_room_state_ids::v1::Request::new(id.clone(), room_id)).await;
            assert_eq!((status, answer["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{answer}");
            let (status, answer) = b.send(&ca, &a, get_event::v1::Request::new(id.clone())).await;
            assert_eq!(status, 404, "{answer}");
        }
        let topic_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room));
        let (_, topic) = a.server.get(&topic_path, Some(&alice.token)).await;
        assert_eq!(topic["topic"], "alice's");

        // Carol's message follows the rejected topic: taken, and read in the timeline.
        let (follows, follows_json) =
            b.sign(draft(&room, &carol, ("m.room.message", None), text("after them"), &[rejected_topic.as_str()], &[&power, &join], 13));
        // One authorised by a rejected event is rejected too.
        let (tainted, tainted_json) =
            b.sign(draft(&room, &carol, ("m.room.message", None), text("tainted"), &[&join], &[&power, &join, rejected.as_str()], 14));
        let (status, answer) = b.transaction(&ca, &a, "r2", &[follows_json, tainted_json, rejected_json]).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["pdus"][follows.as_str()], json!({}), "{answer}");
        assert!(readable(&a.server, &alice, &room, follows.as_str()).await.is_some(), "the follower was not taken");
        assert!(readable(&a.server, &alice, &room, tainted.as_str()).await.is_none(), "the tainted one was taken");
        assert!(readable(&a.server, &alice, &room, rejected.as_str()).await.is_none(), "sent again, taken");
        let messages = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=20", enc(&room));
        let (_, page) = a.server.get(&messages, Some(&alice.token)).await;
        let bodies: Vec<&str> = page["chunk"].as_array().unwrap().iter().filter_map(|e| e["content"]["body"].as_str()).collect();
        assert_eq!(bodies, ["after them"], "{page}");
        let (_, topic) = a.server.get(&topic_path, Some(&alice.token)).await;
        assert_eq!(topic["topic"], "alice's");
        a.stop().await;
        b.stop().await;
    }

    /// An event made on a fork (it follows an older event than the room's newest) applies to
    /// the state at its own prev events, and the room's state is resolved across the fork by the
    /// spec's rules: here the topic set earlier loses to the one set later, whichever arrived
    /// last.
    async fn a_fork_resolves_to_the_state_the_rules_give(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(Db::Sqlite, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let room = create_room(&a.server, &alice, json!({"preset": "public_chat", "room_version": "12"})).await;
        let carol = format!("@carol:{}", b.name);
        let (join, _) = join_by_hand(&ca, &b, &a, &room, &carol).await;
        let power_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room));
        let (_, mut power) = a.server.get(&power_path, Some(&alice.token)).await;
        power["users"][&carol] = json!(50);
        let power = put_ok(&a.server, &alice, &power_path, power).await["event_id"].as_str().unwrap().to_owned();
        let topic_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room));
        let (_, power_event) = a.server
            .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&power)), Some(&alice.token)).await;
        let power_ts = power_event["origin_server_ts"].as_u64().unwrap();

        // Carol's topic, made on B as if B had not seen anything after the power levels.
        let topic = |body: &str, ts: u64| {
            b.sign(object(json!({
                "room_id": room, "sender": carol, "type": "m.room.topic", "state_key": "",
                "content": {"topic": body}, "prev_events": [power], "auth_events": [power, join],
                "depth": 100, "origin_server_ts": ts,
            })))
        };
        // Alice's topic, after the power levels, but stamped later than carol's first.
        put_ok(&a.server, &alice, &topic_path, json!({"topic": "alice's"})).await;
        let (early, early_json) = topic("carol's, older", power_ts + 1);
        let (status, answer) = b.transaction(&ca, &a, "f1", &[early_json]).await;
        assert_eq!((status, &answer["pdus"][early.as_str()]), (200, &json!({})), "{answer}");
        assert!(readable(&a.server, &alice, &room, early.as_str()).await.is_some());
        let (_, current) = a.server.get(&topic_path, Some(&alice.token)).await;
        assert_eq!(current["topic"], "alice's", "the older topic of the fork loses");

        // Carol's second, later than everything: it wins though it too comes from the fork.
        let later = u64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap() + 60_000;
        let (late, late_json) = topic("carol's, newer", later);
        let (status, answer) = b.transaction(&ca, &a, "f2", &[late_json]).await;
        assert_eq!((status, &answer["pdus"][late.as_str()]), (200, &json!({})), "{answer}");
        let (_, current) = a.server.get(&topic_path, Some(&alice.token)).await;
        assert_eq!(current["topic"], "carol's, newer");

        // Alice's next event follows every tip of the fork, and the room goes on from the
        // resolved state.
        let merged = crate::common::send_text(&a.server, &alice, &room, "m1", "after the fork").await;
        let (_, merged) = a.server
            .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&merged)), Some(&alice.token)).await;
        assert!(merged["event_id"].is_string(), "{merged}");
        let (_, current) = a.server.get(&topic_path, Some(&alice.token)).await;
        assert_eq!(current["topic"], "carol's, newer");
        a.stop().await;
        b.stop().await;
    }

    /// Events a server never received (it was down long enough for the sender to drop them from
    /// its queue) are fetched from the sender (`get_missing_events`) when a later event names
    /// them, and its users read all of them, in order. (Also: no state is served at an outlier.)
    async fn events_missed_while_down_are_fetched_when_a_later_one_names_them(db: Db) {
        let ca = TestCa::new();
        let a = Federating::start(db, &ca).await;
        let b = Federating::start_with(db, &ca, |config| config.federation.max_backlog_pdus = 1).await;
        let alice = a.server.register("alice", "a long password").await;
        let bob = b.server.register("bob", "a long password").await;
        let room = create_room(&a.server, &alice, json!({"preset": "public_chat", "room_version": "12"})).await;
        let join = format!("/_matrix/client/v3/join/{}?server_name={}", enc(&room), enc(a.name.as_str()));
        let (status, joined) = b.server.post(&join, Some(&bob.token), json!({})).await;
        assert_eq!(status, 200, "{joined}");
        // B keeps the state the join brought as outliers, and has no state at one of them: the
        // create event (its id is the room's, from room version 12).
        let create: OwnedEventId = format!("${}", &room[1..]).try_into().unwrap();
        let ask = get_room_state_ids::v1::Request::new(create, room.as_str().try_into().unwrap());
        let (status, answer) = a.send(&ca, &b, ask).await;
        assert_eq!((status, answer["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{answer}");

        let (a, b) = a
            .down_while(async {
                for (txn, body) in [("m1", "missed 1"), ("m2", "missed 2")] {
                    crate::common::send_text(&b.server, &bob, &room, txn, body).await;
                }
                // B keeps only its newest event for A while A fails (across its own restart too):
                // A is sent "missed 2", never "missed 1".
                let (b, ()) = b.down_while(async {}).await;
                b
            })
            .await;
        crate::common::send_text(&b.server, &bob, &room, "m3", "after the gap").await;

        let started = std::time::Instant::now();
        let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=20", enc(&room));
        let bodies = loop {
            let (status, page) = a.server.get(&path, Some(&alice.token)).await;
            assert_eq!(status, 200, "{page}");
            let mut bodies: Vec<String> = page["chunk"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|event| event["content"]["body"].as_str().map(str::to_owned))
                .collect();
            bodies.reverse();
            if bodies.iter().any(|body| body == "after the gap") {
                break bodies;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "nothing arrived: {page}");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        assert_eq!(bodies, ["missed 1", "missed 2", "after the gap"]);
        a.stop().await;
        b.stop().await;
    }

    /// With `listen.federation` set to the client listener's address, one listener serves both
    /// APIs (for a TLS proxy that does not route by path): the key server (also at its
    /// deprecated path with a key id) and the federation API beside the client API, whose
    /// `openid/userinfo` still answers.
    async fn one_listener_serves_the_client_and_federation_apis(db: Db) {
        let port = free_port();
        let server = TestServer::start_with(db, |config| {
            config.server_name = format!("127.0.0.1:{port}");
            config.listen.client = format!("127.0.0.1:{port}");
            config.listen.federation = format!("127.0.0.1:{port}");
        })
        .await;
        assert_eq!(server.server.federation_addr().map(|a| a.port()), Some(port));
        let (status, keys) = server.get("/_matrix/key/v2/server", None).await;
        assert_eq!((status, &keys["server_name"]), (200, &json!(format!("127.0.0.1:{port}"))), "{keys}");
        // The deprecated form with a key id, which older servers and SyTest call: the same document.
        let (status, by_id) = server.get("/_matrix/key/v2/server/ed25519%3Aanything", None).await;
        assert_eq!((status, &by_id["verify_keys"]), (200, &keys["verify_keys"]), "{by_id}");
        let (status, version) = server.get("/_matrix/federation/v1/version", None).await;
        assert_eq!((status, &version["server"]["name"]), (200, &json!("Hearth")), "{version}");
        let (status, unsigned) = server.get("/_matrix/federation/v1/query/profile?user_id=%40a%3Ab", None).await;
        assert_eq!((status, unsigned["errcode"].as_str()), (401, Some("M_UNAUTHORIZED")), "{unsigned}");
        let (status, openid) = server.get("/_matrix/federation/v1/openid/userinfo?access_token=nope", None).await;
        assert_eq!((status, openid["errcode"].as_str()), (401, Some("M_UNKNOWN_TOKEN")), "{openid}");
        let (status, _) = server.get("/_matrix/client/versions", None).await;
        assert_eq!(status, 200);
        server.stop().await;
    }

    /// Each server's requests are limited once their signature is checked (429 past the burst),
    /// whoever else asks.
    async fn another_servers_requests_are_rate_limited(db: Db) {
        let ca = TestCa::new();
        let a = Federating::start_with(db, &ca, |config| {
            config.rate_limits.enabled = true;
            config.rate_limits.federation_requests_per_second = 0.01;
            config.rate_limits.federation_requests_burst = 3;
        })
        .await;
        let (b, c) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let query = || get_profile_information::v1::Request::new(alice.user_id.as_str().try_into().unwrap());
        for _ in 0..3 {
            let (status, answer) = b.send(&ca, &a, query()).await;
            assert_eq!(status, 200, "{answer}");
        }
        let (status, answer) = b.send(&ca, &a, query()).await;
        assert_eq!((status, answer["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "{answer}");
        let (status, answer) = c.send(&ca, &a, query()).await;
        assert_eq!(status, 200, "another server is not limited by the first: {answer}");
        for server in [a, b, c] {
            server.stop().await;
        }
    }
}

/// `server`'s user `user` in `room` on `to`, joined by hand: `make_join`, the template signed
/// here, `send_join`. Returns the join's id and the room's power levels event id.
pub(crate) async fn join_by_hand(
    ca: &TestCa,
    server: impl Into<Signer<'_>>,
    to: &Federating,
    room: &str,
    user: &str,
) -> (String, String) {
    let server = server.into();
    let mut make = prepare_join_event::v1::Request::new(room.try_into().unwrap(), user.try_into().unwrap());
    make.ver = vec![RoomVersionId::V12];
    let (status, made) = server.send(ca, to, make).await;
    assert_eq!(status, 200, "make_join: {made}");
    assert_eq!(made["room_version"], "12");
    let mut template = object(made["event"].clone());
    template.insert("origin_server_ts".into(), CanonicalJsonValue::Integer(ruma::Int::from(1_700_000_000)));
    let (join_id, join) = server.sign(template);
    let pdu = RawValue::from_string(CanonicalJsonValue::Object(join).to_string()).unwrap();
    let send = create_join_event::v2::Request::new(room.try_into().unwrap(), join_id.clone(), pdu);
    let (status, joined) = server.send(ca, to, send).await;
    assert_eq!(status, 200, "send_join: {joined}");
    let state = joined["state"].as_array().unwrap();
    assert!(state.iter().any(|e| e["type"] == "m.room.create"), "{joined}");
    assert!(!state.iter().any(|e| e["event_id"] == json!(join_id.as_str())));
    let power = state.iter().find(|e| e["type"] == "m.room.power_levels").unwrap();
    let power_id = ::federation::pdu::event_id_of(&object(power.clone()), &RoomVersionId::V12).unwrap();
    assert!(!joined["auth_chain"].as_array().unwrap().is_empty());
    (join_id.to_string(), power_id.to_string())
}

/// Whether `who` can read event `id` of `room` on `server`.
pub(crate) async fn readable(server: &TestServer, who: &Session, room: &str, id: &str) -> Option<Value> {
    let (status, event) = server
        .get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room), enc(id)), Some(&who.token))
        .await;
    (status == 200).then_some(event)
}
