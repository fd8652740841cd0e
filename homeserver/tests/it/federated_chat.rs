//! One scenario of a room shared across two servers, played against any pair (two Hearths,
//! Hearth and Synapse): a user of the host creates a public room with an alias, a user of the
//! other server joins it by the alias, messages sent on either side reach the other's `/sync`
//! in the order sent, and a name set by the host holds on both.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{
    common::{TestServer, enc},
    synapse::Synapse,
    tls::TestCa,
};

/// A signed-in user of one of the servers, spoken to over the client-server API.
pub(crate) enum Client<'a> {
    Hearth(&'a TestServer, &'a str),
    Synapse(&'a Synapse, &'a TestCa, &'a str),
}

impl Client<'_> {
    pub(crate) async fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        match self {
            Client::Hearth(server, token) => server.request(method, path, Some(token), body).await,
            Client::Synapse(synapse, ca, token) => synapse.request(ca, method, path, token, body).await,
        }
    }

    async fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        let (status, answer) = self.request(method, path, Some(body)).await;
        assert_eq!(status, 200, "{method} {path}: {answer}");
        answer
    }

    async fn sync(&self, since: Option<&str>) -> Value {
        let path = match since {
            Some(since) => format!("/_matrix/client/v3/sync?since={since}&timeout=1000"),
            None => "/_matrix/client/v3/sync".to_owned(),
        };
        let (status, answer) = self.request("GET", &path, None).await;
        assert_eq!(status, 200, "{answer}");
        answer
    }

    async fn send_text(&self, room: &str, txn: &str, body: &str) {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room));
        self.ok("PUT", &path, json!({"msgtype": "m.text", "body": body})).await;
    }
}

/// The `m.room.message` bodies of a room's timeline in a `/sync` answer, in order.
fn message_bodies(sync: &Value, room: &str) -> Vec<String> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|event| event["type"] == "m.room.message")
        .filter_map(|event| event["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

/// Follows `who`'s `/sync` from `since` until `count` messages arrived in `room` (up to 30 s);
/// their bodies in order.
async fn messages_after(
    who: &Client<'_>,
    mut since: String,
    room: &str,
    count: usize,
    context: &dyn Fn() -> String,
) -> Vec<String> {
    let started = Instant::now();
    let mut bodies = Vec::new();
    while bodies.len() < count {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out; messages so far: {bodies:?}; {}",
            context()
        );
        let answer = who.sync(Some(&since)).await;
        bodies.extend(message_bodies(&answer, room));
        since = answer["next_batch"].as_str().unwrap_or(&since).to_owned();
    }
    bodies
}

/// The scenario: `host` (of server `host_name`) makes a room with alias `#{alias}`, `guest`
/// joins it by the alias and they chat. `context` describes the run for failures.
pub(crate) async fn chat(
    host: &Client<'_>,
    host_name: &impl std::fmt::Display,
    guest: &Client<'_>,
    alias: &str,
    context: &dyn Fn() -> String,
) {
    let created = host
        .ok(
            "POST",
            "/_matrix/client/v3/createRoom",
            json!({"room_alias_name": alias, "preset": "public_chat", "room_version": "12"}),
        )
        .await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    let full_alias = format!("#{alias}:{host_name}");
    let (status, joined) = guest
        .request("POST", &format!("/_matrix/client/v3/join/{}", enc(&full_alias)), Some(json!({})))
        .await;
    assert_eq!((status, &joined["room_id"]), (200, &json!(room)), "{joined}; {}", context());

    // The host hears the guest, in order.
    let since = host.sync(None).await["next_batch"].as_str().unwrap().to_owned();
    for (i, body) in ["one from the guest", "two from the guest"].iter().enumerate() {
        guest.send_text(&room, &format!("g{i}"), body).await;
    }
    let bodies = messages_after(host, since, &room, 2, context).await;
    assert_eq!(bodies, ["one from the guest", "two from the guest"], "{}", context());

    // The guest hears the host, in order, and sees the name the host sets.
    let since = guest.sync(None).await["next_batch"].as_str().unwrap().to_owned();
    for (i, body) in ["one from the host", "two from the host", "three from the host"].iter().enumerate() {
        host.send_text(&room, &format!("h{i}"), body).await;
    }
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room));
    host.ok("PUT", &path, json!({"name": "The Hall"})).await;
    let bodies = messages_after(guest, since, &room, 3, context).await;
    assert_eq!(bodies, ["one from the host", "two from the host", "three from the host"], "{}", context());
    let started = Instant::now();
    loop {
        let (status, name) = guest.request("GET", &path, None).await;
        if status == 200 {
            assert_eq!(name["name"], "The Hall");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the name did not arrive: {name}; {}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Both see both members joined.
    for who in [host, guest] {
        let (status, members) = who
            .request("GET", &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room)), None)
            .await;
        assert_eq!(status, 200, "{members}");
        assert_eq!(members["joined"].as_object().map(|m| m.len()), Some(2), "{members}; {}", context());
    }
}
