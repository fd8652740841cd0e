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

/// The `m.room.message` events of a room's timeline in a `/sync` answer, in order: (id, body).
fn messages(sync: &Value, room: &str) -> Vec<(String, String)> {
    sync["rooms"]["join"][room]["timeline"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|event| event["type"] == "m.room.message")
        .filter_map(|event| {
            Some((event["event_id"].as_str()?.to_owned(), event["content"]["body"].as_str()?.to_owned()))
        })
        .collect()
}

/// A `/sync` followed from some point on, and the messages of a room it already showed.
struct Listener {
    since: String,
    seen: std::collections::HashSet<String>,
}

impl Listener {
    /// Starts at the present (an initial sync), every message of the room so far seen.
    async fn start(who: &Client<'_>, room: &str) -> Self {
        let first = who.sync(None).await;
        let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(room));
        let (status, history) = who.request("GET", &path, None).await;
        assert_eq!(status, 200, "{history}");
        let seen = history["chunk"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|event| event["event_id"].as_str().map(str::to_owned))
            .chain(messages(&first, room).into_iter().map(|(id, _)| id))
            .collect();
        Self { since: first["next_batch"].as_str().unwrap().to_owned(), seen }
    }

    /// Follows the sync until `count` new messages arrived in `room` (up to 30 s); their bodies
    /// in order. A limited timeline may repeat older events (Synapse's does): what was seen
    /// already is not counted again.
    async fn messages(
        mut self,
        who: &Client<'_>,
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
            let answer = who.sync(Some(&self.since)).await;
            for (id, body) in messages(&answer, room) {
                if self.seen.insert(id) {
                    bodies.push(body);
                }
            }
            self.since = answer["next_batch"].as_str().unwrap_or(&self.since).to_owned();
        }
        bodies
    }
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
    for (i, body) in ["said before 1", "said before 2", "said before 3"].iter().enumerate() {
        host.send_text(&room, &format!("b{i}"), body).await;
    }
    let full_alias = format!("#{alias}:{host_name}");
    let (status, joined) = guest
        .request("POST", &format!("/_matrix/client/v3/join/{}", enc(&full_alias)), Some(json!({})))
        .await;
    assert_eq!((status, &joined["room_id"]), (200, &json!(room)), "{joined}; {}", context());

    // What was said before the guest joined is there for the guest, in order, the history
    // being shared (fetched from the host's server when the guest's server has not got it).
    let history = history_bodies(guest, &room).await;
    assert_eq!(history, ["said before 1", "said before 2", "said before 3"], "{}", context());

    // The host hears the guest, in order.
    let listener = Listener::start(host, &room).await;
    for (i, body) in ["one from the guest", "two from the guest"].iter().enumerate() {
        guest.send_text(&room, &format!("g{i}"), body).await;
    }
    let bodies = listener.messages(host, &room, 2, context).await;
    assert_eq!(bodies, ["one from the guest", "two from the guest"], "{}", context());

    // The guest hears the host, in order, and sees the name the host sets.
    let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room));
    let listener = Listener::start(guest, &room).await;
    for (i, body) in ["one from the host", "two from the host", "three from the host"].iter().enumerate() {
        host.send_text(&room, &format!("h{i}"), body).await;
    }
    host.ok("PUT", &path, json!({"name": "The Hall"})).await;
    let bodies = listener.messages(guest, &room, 3, context).await;
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

    // Kicked: the guest's server learns it; the room being public, the guest comes back.
    let guest_id = joined_member_other_than(host, &room).await;
    let since = guest.sync(None).await["next_batch"].as_str().unwrap().to_owned();
    host.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)),
        json!({"user_id": guest_id, "reason": "out"}),
    )
    .await;
    let reason =
        sync_until(guest, since, context, |sync| membership_change(sync, &room, &guest_id, "leave")).await;
    assert_eq!(reason, "out");
    let (status, joined) = guest
        .request("POST", &format!("/_matrix/client/v3/join/{}", enc(&full_alias)), Some(json!({})))
        .await;
    assert_eq!(status, 200, "rejoining after a kick: {joined}; {}", context());
}

/// The message bodies of `room` as `who` pages back through all of it (`/messages`), oldest
/// first.
async fn history_bodies(who: &Client<'_>, room: &str) -> Vec<String> {
    let mut bodies = Vec::new();
    let mut from: Option<String> = None;
    for _ in 0..20 {
        let mut path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=10", enc(room));
        if let Some(from) = &from {
            path.push_str(&format!("&from={from}"));
        }
        let (status, page) = who.request("GET", &path, None).await;
        assert_eq!(status, 200, "{page}");
        for event in page["chunk"].as_array().into_iter().flatten() {
            if event["type"] == "m.room.message"
                && let Some(body) = event["content"]["body"].as_str()
            {
                bodies.push(body.to_owned());
            }
        }
        match page["end"].as_str() {
            Some(end) if !page["chunk"].as_array().is_none_or(Vec::is_empty) => from = Some(end.to_owned()),
            _ => break,
        }
    }
    bodies.reverse();
    bodies
}

/// The member of `room` other than `who`.
async fn joined_member_other_than(who: &Client<'_>, room: &str) -> String {
    let (_, me) = who.request("GET", "/_matrix/client/v3/account/whoami", None).await;
    let (_, members) =
        who.request("GET", &format!("/_matrix/client/v3/rooms/{}/joined_members", enc(room)), None).await;
    members["joined"].as_object().unwrap().keys().find(|id| **id != me["user_id"]).unwrap().clone()
}

/// Follows `who`'s `/sync` from `since` until `found` picks something out of an answer (up to
/// 30 s).
async fn sync_until<T>(
    who: &Client<'_>,
    mut since: String,
    context: &dyn Fn() -> String,
    found: impl Fn(&Value) -> Option<T>,
) -> T {
    let started = Instant::now();
    loop {
        assert!(started.elapsed() < Duration::from_secs(30), "timed out; {}", context());
        let answer = who.sync(Some(&since)).await;
        if let Some(found) = found(&answer) {
            return found;
        }
        since = answer["next_batch"].as_str().unwrap_or(&since).to_owned();
    }
}

/// The reason of `member`'s change to `membership` in `room`, if a `/sync` answer has it in the
/// timeline of the room (left or joined).
fn membership_change(sync: &Value, room: &str, member: &str, membership: &str) -> Option<String> {
    ["leave", "join"].iter().find_map(|section| {
        sync["rooms"][*section][room]["timeline"]["events"].as_array()?.iter().find_map(|e| {
            (e["type"] == "m.room.member"
                && e["state_key"] == member
                && e["content"]["membership"] == membership)
                .then(|| e["content"]["reason"].as_str().unwrap_or_default().to_owned())
        })
    })
}

/// The second scenario: `host` invites `guest` (user id `guest_id`) to a private room; the
/// guest sees the invite with the room's name, joins by the room's id, gets power from the
/// host, then is banned; each change holds on both servers.
pub(crate) async fn invite_and_ban(
    host: &Client<'_>,
    guest: &Client<'_>,
    guest_id: &str,
    context: &dyn Fn() -> String,
) {
    let created = host
        .ok(
            "POST",
            "/_matrix/client/v3/createRoom",
            json!({"preset": "private_chat", "name": "Private", "room_version": "12"}),
        )
        .await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    // Said while only members who had joined might read it: never the guest's.
    let visibility = format!("/_matrix/client/v3/rooms/{}/state/m.room.history_visibility/", enc(&room));
    host.ok("PUT", &visibility, json!({"history_visibility": "joined"})).await;
    host.send_text(&room, "secret", "a secret").await;
    let since = guest.sync(None).await["next_batch"].as_str().unwrap().to_owned();
    host.ok("POST", &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)), json!({"user_id": guest_id}))
        .await;
    let invite_state = sync_until(guest, since, context, |sync| {
        sync["rooms"]["invite"][room.as_str()]["invite_state"]["events"].as_array().cloned()
    })
    .await;
    assert!(
        invite_state.iter().any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Private"),
        "{invite_state:?}"
    );
    assert!(invite_state.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == guest_id));
    let (status, joined) = guest
        .request("POST", &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(json!({})))
        .await;
    assert_eq!(status, 200, "{joined}; {}", context());
    let history = history_bodies(guest, &room).await;
    assert!(!history.contains(&"a secret".to_owned()), "{history:?}; {}", context());

    // Power given on the host holds on the guest's server.
    let power_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room));
    let (_, mut power) = host.request("GET", &power_path, None).await;
    power["users"][guest_id] = json!(50);
    host.ok("PUT", &power_path, power).await;
    let started = Instant::now();
    loop {
        let (_, seen) = guest.request("GET", &power_path, None).await;
        if seen["users"][guest_id] == 50 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "power levels on the guest's server: {seen}; {}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Both set the topic at once: whether or not the room's history forks, both servers end
    // with the same topic (state resolution where it forked).
    let topic_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/", enc(&room));
    let (host_set, guest_set) = tokio::join!(
        host.request("PUT", &topic_path, Some(json!({"topic": "the host's"}))),
        guest.request("PUT", &topic_path, Some(json!({"topic": "the guest's"}))),
    );
    assert_eq!((host_set.0, guest_set.0), (200, 200), "{host_set:?} {guest_set:?}");
    let started = Instant::now();
    loop {
        let (_, on_host) = host.request("GET", &topic_path, None).await;
        let (_, on_guest) = guest.request("GET", &topic_path, None).await;
        if on_host["topic"].is_string() && on_host == on_guest {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the topics differ: {on_host} and {on_guest}; {}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Banned: the guest's server learns it (a server that was kicked out first would not:
    // it is no longer in the room).
    let since = guest.sync(None).await["next_batch"].as_str().unwrap().to_owned();
    host.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)),
        json!({"user_id": guest_id, "reason": "gone"}),
    )
    .await;
    let reason =
        sync_until(guest, since, context, |sync| membership_change(sync, &room, guest_id, "ban")).await;
    assert_eq!(reason, "gone");
    let member_path =
        format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(guest_id));
    let (status, member) = host.request("GET", &member_path, None).await;
    assert_eq!((status, &member["membership"]), (200, &json!("ban")), "{member}");
    // Banned, the guest cannot come back: refused by the host (Hearth relays its 403), or by a
    // server that no longer knows whom to ask (Synapse answers 404).
    let (status, refused) = guest
        .request("POST", &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(json!({})))
        .await;
    assert!(matches!(status, 403 | 404), "{status} {refused}; {}", context());
}

/// The third scenario: `host` invites `guest` (user id `guest_id`) to a private room and the
/// guest rejects the invite: the host's server has the guest's leave, and the invite is gone
/// from the guest's sync.
pub(crate) async fn invite_rejected(
    host: &Client<'_>,
    guest: &Client<'_>,
    guest_id: &str,
    context: &dyn Fn() -> String,
) {
    let created = host
        .ok("POST", "/_matrix/client/v3/createRoom", json!({"preset": "private_chat", "room_version": "12"}))
        .await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    let since = guest.sync(None).await["next_batch"].as_str().unwrap().to_owned();
    host.ok("POST", &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)), json!({"user_id": guest_id}))
        .await;
    let since = sync_until(guest, since, context, |sync| {
        sync["rooms"]["invite"].get(room.as_str()).map(|_| sync["next_batch"].as_str().unwrap().to_owned())
    })
    .await;
    let (status, left) = guest
        .request(
            "POST",
            &format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)),
            Some(json!({"reason": "no thanks"})),
        )
        .await;
    assert_eq!(status, 200, "rejecting the invite: {left}; {}", context());
    let member_path =
        format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(guest_id));
    let (status, member) = host.request("GET", &member_path, None).await;
    assert_eq!((status, &member["membership"]), (200, &json!("leave")), "{member}; {}", context());
    sync_until(guest, since, context, |sync| sync["rooms"]["leave"].get(room.as_str()).map(|_| ())).await;
}
