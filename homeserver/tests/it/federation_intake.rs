//! How a Hearth takes events from another server when it lacks what they build on, and how it
//! tells rejected events from soft-failed ones (the spec's "Checks performed on receipt of a
//! PDU"): the state across a gap too long to fetch event by event (`state_ids`), auth events it
//! never got (`event_auth`), an event its own auth events do not allow, and one that only the
//! room's current state refuses.

use serde_json::{Value, json};

use crate::{
    common::{Db, Session, TestServer, create_room, enc, put_ok, send_text},
    federation::{Federating, StandIn, draft, join_by_hand, object, readable},
    tls::TestCa,
};

/// The bodies of the messages `who` reads in `room`, oldest first, once `last` is among them.
async fn bodies_through(server: &TestServer, who: &Session, room: &str, last: &str) -> Vec<String> {
    let started = std::time::Instant::now();
    let path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(room));
    loop {
        let (status, page) = server.get(&path, Some(&who.token)).await;
        assert_eq!(status, 200, "{page}");
        let mut bodies: Vec<String> = page["chunk"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|event| event["content"]["body"].as_str().map(str::to_owned))
            .collect();
        bodies.reverse();
        if bodies.iter().any(|body| body == last) {
            return bodies;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "{last} did not arrive: {page}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// A Hearth with alice's public room (version 12), which carol of a stand-in server joined by
/// hand: her join's id and the room's power levels' id.
struct Joined {
    a: Federating,
    stand_in: StandIn,
    alice: Session,
    room: String,
    carol: String,
    join: String,
    power: String,
}

impl Joined {
    async fn start(db: Db, ca: &TestCa) -> Self {
        let a = Federating::start(db, ca).await;
        let stand_in = StandIn::start(ca).await;
        let alice = a.server.register("alice", "a long password").await;
        let room =
            create_room(&a.server, &alice, json!({"preset": "public_chat", "room_version": "12"})).await;
        let carol = format!("@carol:{}", stand_in.name);
        let (join, power) = join_by_hand(ca, stand_in.signer(), &a, &room, &carol).await;
        Self { a, stand_in, alice, room, carol, join, power }
    }
}

fn text(body: &str) -> Value {
    json!({"msgtype": "m.text", "body": body})
}

crate::on_both_backends! {
    /// A server that missed more events than its sender kept queued for it plus what
    /// `get_missing_events` fetches (it was down long) takes the newest of them and, for the
    /// older ones it still lacks, the room's state at their edge (`state_ids`): a display name set
    /// inside the part never fetched holds on it, and the room goes on with both servers.
    async fn a_gap_longer_than_missing_events_fetch_is_bridged_by_the_state_at_its_edge(db: Db) {
        let ca = TestCa::new();
        let a = Federating::start(db, &ca).await;
        let b = Federating::start_with(db, &ca, |config| config.federation.max_backlog_pdus = 10).await;
        let alice = a.server.register("alice", "a long password").await;
        let bob = b.server.register("bob", "a long password").await;
        let room = create_room(&a.server, &alice, json!({"preset": "public_chat", "room_version": "12"})).await;
        let join = format!("/_matrix/client/v3/join/{}?server_name={}", enc(&room), enc(a.name.as_str()));
        let (status, joined) = b.server.post(&join, Some(&bob.token), json!({})).await;
        assert_eq!(status, 200, "{joined}");
        send_text(&a.server, &alice, &room, "a0", "before").await;
        bodies_through(&b.server, &bob, &room, "before").await;

        let missed = 40;
        let (a, b) = a
            .down_while(async {
                send_text(&b.server, &bob, &room, "m0", "missed 0").await;
                let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.user_id));
                put_ok(&b.server, &bob, &path, json!({"displayname": "Bobby"})).await;
                for n in 1..=missed {
                    send_text(&b.server, &bob, &room, &format!("m{n}"), &format!("missed {n}")).await;
                }
                // B keeps its newest 10 for A while A fails (across its own restart too).
                let (b, ()) = b.down_while(async {}).await;
                b
            })
            .await;
        send_text(&b.server, &bob, &room, "after", "after the gap").await;

        let bodies = bodies_through(&a.server, &alice, &room, "after the gap").await;
        // "before", then the newest of the missed (a run ending at the last), then the new one.
        let (first, rest) = bodies.split_first().unwrap();
        assert_eq!(first, "before", "{bodies:?}");
        let (last, fetched) = rest.split_last().unwrap();
        assert_eq!(last, "after the gap", "{bodies:?}");
        let from = missed + 1 - fetched.len();
        assert!(from > 1, "the whole gap was fetched event by event: {bodies:?}");
        let expected: Vec<String> = (from..=missed).map(|n| format!("missed {n}")).collect();
        assert_eq!(fetched, expected, "{bodies:?}");
        let member = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&bob.user_id));
        let (status, member) = a.server.get(&member, Some(&alice.token)).await;
        assert_eq!((status, &member["displayname"]), (200, &json!("Bobby")), "{member}");

        send_text(&a.server, &alice, &room, "a1", "across the gap").await;
        bodies_through(&b.server, &bob, &room, "across the gap").await;
        a.stop().await;
        b.stop().await;
    }

    /// An event naming auth events this server never got is taken once its sender gives them
    /// (`event_auth`) and they check out; one whose fetched auth event is not signed by its
    /// server is refused, and that auth event is not kept.
    async fn auth_events_a_server_lacks_are_fetched_from_the_sender_and_checked(db: Db) {
        let ca = TestCa::new();
        let Joined { a, stand_in, alice, room, carol, join, power } = Joined::start(db, &ca).await;
        let signer = stand_in.signer();
        let (_, room_state) = a.server.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(&room)), Some(&alice.token)).await;
        let join_rules = room_state.as_array().unwrap().iter().find(|e| e["type"] == "m.room.join_rules").unwrap();
        let join_rules = join_rules["event_id"].as_str().unwrap().to_owned();
        let member = |name: &str| {
            let content = json!({"membership": "join", "displayname": name});
            draft(&room, &carol, ("m.room.member", Some(&carol)), content, &[&join], &[&power, &join_rules, &join], 11)
        };
        // A display name change A never gets, and a message it authorises.
        let (renamed, renamed_json) = signer.sign(member("Carol"));
        let (message, message_json) =
            signer.sign(draft(&room, &carol, ("m.room.message", None), text("named"), &[&join], &[&power, renamed.as_str()], 12));
        let auth_path = |id: &str| format!("/_matrix/federation/v1/event_auth/{room}/{id}");
        stand_in.answer(&auth_path(message.as_str()), json!({"auth_chain": [renamed_json]}));
        let (status, answer) = signer.transaction(&ca, &a, "t1", &[message_json]).await;
        assert_eq!((status, &answer["pdus"][message.as_str()]), (200, &json!({})), "{answer}");
        assert!(stand_in.asked().contains(&auth_path(message.as_str())), "{:?}", stand_in.asked());
        let read = readable(&a.server, &alice, &room, message.as_str()).await;
        assert_eq!(read.map(|event| event["content"]["body"].clone()), Some(json!("named")));

        // The same with the auth event's signature broken.
        let (forged, mut forged_json) = signer.sign(member("Mallory"));
        let signatures = forged_json.get_mut("signatures").unwrap();
        let ruma::CanonicalJsonValue::Object(by_server) = signatures else { panic!("signed") };
        let ruma::CanonicalJsonValue::Object(by_key) = by_server.values_mut().next().unwrap() else { panic!() };
        let signature = by_key.values_mut().next().unwrap();
        *signature = ruma::CanonicalJsonValue::String("A".repeat(86));
        let (tainted, tainted_json) =
            signer.sign(draft(&room, &carol, ("m.room.message", None), text("forged"), &[&join], &[&power, forged.as_str()], 12));
        stand_in.answer(&auth_path(tainted.as_str()), json!({"auth_chain": [forged_json]}));
        let (status, answer) = signer.transaction(&ca, &a, "t2", &[tainted_json]).await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer["pdus"][tainted.as_str()]["error"].is_string(), "{answer}");
        assert!(readable(&a.server, &alice, &room, tainted.as_str()).await.is_none());
        let (status, kept) = signer.send(&ca, &a, ruma::api::federation::event::get_event::v1::Request::new(forged)).await;
        assert_eq!(status, 404, "the forged auth event was kept: {kept}");
        stand_in.handle.stop(false).await;
        a.stop().await;
    }

    /// The auth rules on receipt, in the spec's order: an event its own auth events do not
    /// allow is rejected though the room's current state would; one allowed by the state where
    /// it was made (a fork) but not by the room's current state is soft-failed: answered as
    /// handled, kept out of the timeline (`/messages`) and off the room's newest events (the next
    /// event does not follow it), while an event following it is checked against the state
    /// after it and taken.
    async fn an_event_its_own_auth_events_refuse_is_rejected_and_one_only_the_current_state_refuses_is_soft_failed(db: Db) {
        let ca = TestCa::new();
        let (a, b) = (Federating::start(db, &ca).await, Federating::start(Db::Sqlite, &ca).await);
        let alice = a.server.register("alice", "a long password").await;
        let room = create_room(&a.server, &alice, json!({"preset": "public_chat", "room_version": "12"})).await;
        let carol = format!("@carol:{}", b.name);
        let (join, power) = join_by_hand(&ca, &b, &a, &room, &carol).await;

        // Naming only the power levels, not her join: not allowed by its own auth events.
        let (unjoined, unjoined_json) =
            b.sign(draft(&room, &carol, ("m.room.message", None), text("no join named"), &[&join], &[&power], 11));
        let (status, answer) = b.transaction(&ca, &a, "s0", &[unjoined_json]).await;
        assert_eq!((status, &answer["pdus"][unjoined.as_str()]), (200, &json!({})), "{answer}");
        assert!(readable(&a.server, &alice, &room, unjoined.as_str()).await.is_none(), "taken");

        // Alice restricts `test.sf` events to power 50; carol's server has not seen that.
        let power_path = format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room));
        let (_, mut levels) = a.server.get(&power_path, Some(&alice.token)).await;
        levels["events"]["test.sf"] = json!(50);
        let restricted = put_ok(&a.server, &alice, &power_path, levels).await["event_id"].as_str().unwrap().to_owned();
        let (m1, m1_json) =
            b.sign(draft(&room, &carol, ("m.room.message", None), text("m1"), &[&join], &[&power, &join], 12));
        let (sf, sf_json) =
            b.sign(draft(&room, &carol, ("test.sf", None), json!({"body": "sf"}), &[m1.as_str()], &[&power, &join], 13));
        let (status, answer) = b.transaction(&ca, &a, "s1", &[m1_json, sf_json]).await;
        assert_eq!((status, &answer["pdus"]), (200, &json!({m1.as_str(): {}, sf.as_str(): {}})), "{answer}");
        assert!(readable(&a.server, &alice, &room, m1.as_str()).await.is_some(), "m1 not taken");
        let bodies = bodies_through(&a.server, &alice, &room, "m1").await;
        assert!(!bodies.iter().any(|body| body == "sf"), "the soft-failed event is in the timeline: {bodies:?}");

        // Alice's next event follows the room's newest events: her power levels and m1, not sf.
        let next = send_text(&a.server, &alice, &room, "n1", "next").await;
        let ask = ruma::api::federation::event::get_event::v1::Request::new(next.as_str().try_into().unwrap());
        let (status, fetched) = b.send(&ca, &a, ask).await;
        assert_eq!(status, 200, "{fetched}");
        let mut prev: Vec<&str> = fetched["pdus"][0]["prev_events"].as_array().unwrap().iter().map(|id| id.as_str().unwrap()).collect();
        prev.sort_unstable();
        let mut expected = vec![restricted.as_str(), m1.as_str()];
        expected.sort_unstable();
        assert_eq!(prev, expected, "{fetched}");

        // A message following the soft-failed event is allowed by the state after it: taken.
        let (after, after_json) = b.sign(object(json!({
            "room_id": room, "sender": carol, "type": "m.room.message", "content": text("after sf"),
            "prev_events": [sf], "auth_events": [power, join], "depth": 14, "origin_server_ts": 1_700_000_000_014u64,
        })));
        let (status, answer) = b.transaction(&ca, &a, "s2", &[after_json]).await;
        assert_eq!((status, &answer["pdus"][after.as_str()]), (200, &json!({})), "{answer}");
        assert!(readable(&a.server, &alice, &room, after.as_str()).await.is_some(), "the follower was not taken");
        let bodies = bodies_through(&a.server, &alice, &room, "after sf").await;
        assert!(!bodies.iter().any(|body| body == "sf" || body == "no join named"), "{bodies:?}");
        a.stop().await;
        b.stop().await;
    }

    /// An event sent to a server that follows events its sender does not give (`get_missing_events`
    /// answers none) is refused: the server does not ask for the state there, which the sender
    /// could make up, as it does for events it fetched itself.
    async fn a_sent_event_whose_prev_events_cannot_be_had_is_refused_without_asking_for_the_state(db: Db) {
        let ca = TestCa::new();
        let Joined { a, stand_in, alice, room, carol, join, power } = Joined::start(db, &ca).await;
        let signer = stand_in.signer();
        let (unsent, _) =
            signer.sign(draft(&room, &carol, ("m.room.message", None), text("never given"), &[&join], &[&power, &join], 11));
        let (sent, sent_json) =
            signer.sign(draft(&room, &carol, ("m.room.message", None), text("sent"), &[unsent.as_str()], &[&power, &join], 12));
        let missing_path = format!("/_matrix/federation/v1/get_missing_events/{room}");
        stand_in.answer(&missing_path, json!({"events": []}));
        let (status, answer) = signer.transaction(&ca, &a, "g1", &[sent_json]).await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer["pdus"][sent.as_str()]["error"].is_string(), "{answer}");
        assert!(readable(&a.server, &alice, &room, sent.as_str()).await.is_none());
        let asked = stand_in.asked();
        assert!(asked.contains(&missing_path), "{asked:?}");
        assert!(!asked.iter().any(|path| path.contains("/state")), "the state was asked for: {asked:?}");
        stand_in.handle.stop(false).await;
        a.stop().await;
    }
}
