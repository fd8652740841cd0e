//! Federation between two Hearths, each with its own database and a federation listener that
//! speaks TLS on loopback (a certificate from a throwaway CA both trust), named
//! `127.0.0.1:PORT` as the spec allows without DNS.

use ruma::{
    OwnedServerName, ServerName,
    api::{
        OutgoingRequestExt,
        federation::{authentication::XMatrixSigningInput, query::get_profile_information},
    },
};
use serde_json::{Value, json};

use crate::{
    common::{Db, Session, TestServer, create_room, enc, put_ok},
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
        let port = free_port();
        let name = OwnedServerName::try_from(format!("127.0.0.1:{port}")).unwrap();
        let (certificate, private_key) = ca.server_files();
        let ca_file = ca.ca_file();
        let server_name = name.to_string();
        let server = TestServer::start_with(db, move |config| {
            config.server_name = server_name.clone();
            config.listen.federation = server_name;
            config.tls.certificate = certificate;
            config.tls.private_key = private_key;
            config.federation.extra_ca_file = ca_file;
            config.federation.allow_private_addresses = true;
            config.federation.old_signing_keys = vec![homeserver::config::OldSigningKey {
                key_id: "ed25519:retired".to_owned(),
                public_key: "l8Hft5qXKn1vfHrg3p4+W8gELQVo8N13JkluMfmn2sQ".to_owned(),
                expired_ts: 1_700_000_000_000,
            }];
        })
        .await;
        assert_eq!(server.server.federation_addr().map(|a| a.port()), Some(port));
        Self { server, name, federation_base: format!("https://127.0.0.1:{port}") }
    }

    pub(crate) async fn stop(self) {
        self.server.stop().await;
    }
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
    async fn users_and_aliases_of_another_server_are_found_through_signed_requests(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(db, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let bob = b.server.register("bob", "a long password").await;
        set_name(&b.server, &bob, "Bob of B").await;
        let room = create_room(&b.server, &bob, json!({"room_alias_name": "lobby"})).await;

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

        // Still serving.
        let (status, _) = profile_query(&ca, &a, &b, user, as_is, unchanged).await;
        assert_eq!(status, 200);
        a.stop().await;
        b.stop().await;
    }
}
