//! Hardening: what a request may hold (no NUL, the spec's lengths, bounded lists) and how often a
//! user or an address may try (rate limits on sends, logins and UIA passwords).

use serde_json::{Value, json};

use crate::common::{Db, Session, TestServer, assert_error};

const PW: &str = "correct horse battery";

fn enc(s: &str) -> String {
    s.replace('!', "%21").replace(':', "%3A").replace('#', "%23").replace('@', "%40").replace('$', "%24")
}

fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{rest}", enc(room))
}

async fn create_room(server: &TestServer, who: &Session, body: Value) -> String {
    let (status, created) = server.post("/_matrix/client/v3/createRoom", Some(&who.token), body).await;
    assert_eq!(status, 200, "{created}");
    created["room_id"].as_str().unwrap().to_owned()
}

crate::on_both_backends! {
    /// A NUL (`\u0000` in JSON, `%00` in a path or query) is refused with 400 by every endpoint,
    /// on both backends (Postgres cannot store it and used to answer 500).
    async fn nul_is_refused_everywhere(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let t = Some(alice.token.as_str());
        let me = enc(&alice.user_id);
        let room = create_room(&server, &alice, json!({"name": "before"})).await;
        let (status, sent) = server.request("PUT", &room_path(&room, "send/m.room.message/t1"), t,
            Some(json!({"msgtype": "m.text", "body": "stored before"}))).await;
        assert_eq!(status, 200, "{sent}");

        // In the path or the query: M_INVALID_PARAM.
        for (method, path) in [
            ("PUT", room_path(&room, "state/m.room.topic/a%00b")),
            ("PUT", room_path(&room, "send/m.ro%00om/t2")),
            ("PUT", room_path(&room, "send/m.room.message/t%00")),
            ("PUT", format!("/_matrix/client/v3/user/{me}/account_data/x%00y")),
            ("GET", format!("/_matrix/client/v3/user/{me}/filter/1%00")),
            ("GET", "/_matrix/client/v3/directory/room/%23a%00%3Alocalhost".to_owned()),
            ("GET", "/_matrix/client/v3/sync?filter=%7B%7D%00".to_owned()),
            ("GET", format!("{}?limit=1&from=%00", room_path(&room, "messages"))),
            ("GET", "/_matrix/client/v3/account/whoami?access_token=%00".to_owned()),
        ] {
            let answer = server.request(method, &path, t, Some(json!({"topic": "x"}))).await;
            assert_error(&answer, 400, "M_INVALID_PARAM");
            assert!(answer.1["error"].as_str().unwrap().contains("NUL"), "{path}: {}", answer.1);
        }
        // In a JSON body: M_BAD_JSON, in values and in keys alike.
        for (method, path, body) in [
            ("PUT", format!("/_matrix/client/v3/profile/{me}/displayname"), json!({"displayname": "a\u{0}b"})),
            ("PUT", format!("/_matrix/client/v3/devices/{}", alice.device_id), json!({"display_name": "\u{0}"})),
            ("POST", "/_matrix/client/v3/user_directory/search".to_owned(), json!({"search_term": "al\u{0}"})),
            ("POST", format!("/_matrix/client/v3/user/{me}/filter"), json!({"room": {"rooms": ["!a\u{0}:localhost"]}})),
            ("PUT", format!("/_matrix/client/v3/user/{me}/account_data/org.example"), json!({"k\u{0}": 1})),
            ("PUT", room_path(&room, "send/m.room.message/t3"), json!({"msgtype": "m.text", "body": ["x", {"y": "\u{0}"}]})),
            ("POST", "/_matrix/client/v3/createRoom".to_owned(), json!({"room_alias_name": "a\u{0}"})),
            ("POST", "/_matrix/client/v3/login".to_owned(),
                json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice\u{0}"}, "password": PW})),
            ("POST", "/_hearth/client/v1/threepid/submit_token".to_owned(), json!({"sid": "\u{0}", "client_secret": "a", "token": "1"})),
        ] {
            let answer = server.request(method, &path, t, Some(body)).await;
            assert_error(&answer, 400, "M_BAD_JSON");
            assert!(answer.1["error"].as_str().unwrap().contains("NUL"), "{path}: {}", answer.1);
        }
        let link = server.get("/_hearth/client/v1/threepid/submit_token?sid=%00&client_secret=a&token=1", None).await;
        assert_eq!(link.0, 400, "the emailed link: {}", link.1);

        // An escaped backslash followed by `u0000` is six ordinary characters, not a NUL.
        let literal = server.request("PUT", &room_path(&room, "send/m.room.message/t4"), t,
            Some(json!({"msgtype": "m.text", "body": "\\u0000"}))).await;
        assert_eq!(literal.0, 200, "{}", literal.1);

        // What was stored before is still served.
        let (status, messages) = server.get(&format!("{}?dir=b&limit=10", room_path(&room, "messages")), t).await;
        assert_eq!(status, 200, "{messages}");
        let bodies: Vec<&str> = messages["chunk"].as_array().unwrap().iter()
            .filter_map(|e| e["content"]["body"].as_str()).collect();
        assert_eq!(bodies, ["\\u0000", "stored before"]);
        let (status, name) = server.get(&room_path(&room, "state/m.room.name/"), t).await;
        assert_eq!((status, name["name"].as_str()), (200, Some("before")));
        server.stop().await;
    }
}
