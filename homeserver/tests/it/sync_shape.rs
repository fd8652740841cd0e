//! `/sync` as the spec shapes it: sections always present, `unsigned` as clients read it, room
//! summaries, filters applied in full, the user's own presence.

use serde_json::{Value, json};

use crate::common::{
    Db, Session, TestServer, create_room as create, enc, join_room, put_ok as put, put_state,
    send_text as send, session_of,
};

const PW: &str = "correct horse battery";

fn encode_query(s: &str) -> String {
    s.replace('%', "%25")
        .replace('{', "%7B")
        .replace('}', "%7D")
        .replace('"', "%22")
        .replace(':', "%3A")
        .replace(',', "%2C")
        .replace('[', "%5B")
        .replace(']', "%5D")
        .replace(' ', "%20")
        .replace('+', "%2B")
        .replace('!', "%21")
        .replace('@', "%40")
        .replace('.', "%2E")
}

async fn set_state(server: &TestServer, who: &Session, room: &str, kind: &str, content: Value) -> String {
    put_state(server, who, room, kind, "", content).await
}

async fn join(server: &TestServer, who: &Session, room: &str) {
    let (status, body) = join_room(server, who, room).await;
    assert_eq!(status, 200, "{body}");
}

/// A sync with optional `since` token and inline filter.
async fn sync(server: &TestServer, who: &Session, since: Option<&str>, filter: Option<Value>) -> Value {
    let mut path = "/_matrix/client/v3/sync?timeout=0".to_owned();
    if let Some(since) = since {
        path.push_str(&format!("&since={}", encode_query(since)));
    }
    if let Some(filter) = filter {
        path.push_str(&format!("&filter={}", encode_query(&filter.to_string())));
    }
    let (status, body) = server.get(&path, Some(&who.token)).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn timeline<'a>(sync: &'a Value, room: &str) -> &'a Vec<Value> {
    sync["rooms"]["join"][room]["timeline"]["events"].as_array().unwrap()
}

crate::on_both_backends! {
    async fn every_room_has_each_section_even_when_empty(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat"})).await;
        let gone = create(&server, &alice, json!({"preset": "public_chat"})).await;
        join(&server, &bob, &room).await;
        join(&server, &bob, &gone).await;
        let first = sync(&server, &alice, None, None).await;
        for section in ["join", "invite", "leave"] {
            assert!(first["rooms"][section].is_object(), "rooms.{section} in {first}");
        }
        let since = first["next_batch"].as_str().unwrap().to_owned();
        // Only a typing notification and a leave happen.
        put(&server, &bob, &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&bob.user_id)),
            json!({"typing": true, "timeout": 10000})).await;
        let (status, _) = server.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&gone)), Some(&alice.token), json!({})).await;
        assert_eq!(status, 200);
        let next = sync(&server, &alice, Some(&since), None).await;
        let joined = &next["rooms"]["join"][room.as_str()];
        assert_eq!(joined["timeline"]["events"], json!([]), "{next}");
        assert_eq!(joined["timeline"]["limited"], false, "limited is always there: {joined}");
        assert!(joined["timeline"]["prev_batch"].is_string(), "{joined}");
        for section in ["state", "account_data", "ephemeral"] {
            assert!(joined[section]["events"].is_array(), "{section} in {joined}");
        }
        assert!(joined["unread_notifications"].is_object() && joined["summary"].is_object(), "{joined}");
        assert_eq!(joined["ephemeral"]["events"][0]["type"], "m.typing");
        let left = &next["rooms"]["leave"][gone.as_str()];
        for section in ["timeline", "state", "account_data"] {
            assert!(left[section]["events"].is_array(), "{section} in {left}");
        }
        assert_eq!(left["timeline"]["limited"], false);
        server.stop().await;
    }

    async fn own_events_carry_their_transaction_id_for_the_sending_device_only(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let (status, other) = server.login("alice", PW, json!({})).await;
        assert_eq!(status, 200);
        let other = session_of(&other);
        let bob = server.register("bob", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat"})).await;
        join(&server, &bob, &room).await;
        let sent = send(&server, &alice, &room, "my-txn-1", "hello").await;
        let find = |sync: &Value| {
            timeline(sync, &room).iter().find(|e| e["event_id"] == sent.as_str()).cloned().unwrap()
        };
        let mine = find(&sync(&server, &alice, None, None).await);
        assert_eq!(mine["unsigned"]["transaction_id"], "my-txn-1", "{mine}");
        let on_other_device = find(&sync(&server, &other, None, None).await);
        assert!(on_other_device["unsigned"].get("transaction_id").is_none(), "{on_other_device}");
        let bobs = find(&sync(&server, &bob, None, None).await);
        assert!(bobs["unsigned"].get("transaction_id").is_none(), "{bobs}");
        // Every path that returns the event says the same to each reader.
        let event_path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&sent));
        let messages_path = format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1", enc(&room));
        let context_path = format!("/_matrix/client/v3/rooms/{}/context/{}", enc(&room), enc(&sent));
        for (who, expected) in [(&alice, json!("my-txn-1")), (&other, Value::Null), (&bob, Value::Null)] {
            let (_, event) = server.get(&event_path, Some(&who.token)).await;
            assert_eq!(event["unsigned"]["transaction_id"], expected, "/event: {event}");
            let (_, page) = server.get(&messages_path, Some(&who.token)).await;
            assert_eq!(page["chunk"][0]["unsigned"]["transaction_id"], expected, "/messages: {page}");
            let (_, context) = server.get(&context_path, Some(&who.token)).await;
            assert_eq!(context["event"]["unsigned"]["transaction_id"], expected, "/context: {context}");
        }
        server.stop().await;
    }

    async fn state_events_show_what_they_replaced(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat"})).await;
        join(&server, &bob, &room).await;
        let first = set_state(&server, &alice, &room, "m.room.topic", json!({"topic": "tea"})).await;
        let second = set_state(&server, &alice, &room, "m.room.topic", json!({"topic": "coffee"})).await;
        let find = |sync: &Value, id: &str| timeline(sync, &room).iter().find(|e| e["event_id"] == id).cloned().unwrap();
        let synced = sync(&server, &bob, None, None).await;
        let replacing = find(&synced, &second);
        assert_eq!(replacing["unsigned"]["replaces_state"], first.as_str(), "{replacing}");
        assert_eq!(replacing["unsigned"]["prev_content"], json!({"topic": "tea"}));
        assert_eq!(replacing["unsigned"]["prev_sender"], alice.user_id.as_str());
        assert!(find(&synced, &first)["unsigned"].get("prev_content").is_none(), "the first topic replaced nothing");
        let (_, as_state) = server.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.topic/?format=event", enc(&room)), Some(&bob.token)).await;
        assert_eq!(as_state["unsigned"]["prev_content"], json!({"topic": "tea"}), "{as_state}");
        let (_, page) = server.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1", enc(&room)), Some(&bob.token)).await;
        assert_eq!(page["chunk"][0]["unsigned"]["replaces_state"], first.as_str(), "{page}");
        // A redacted predecessor shows redacted.
        put(&server, &alice, &format!("/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room), enc(&first)), json!({})).await;
        let replacing = find(&sync(&server, &bob, None, None).await, &second);
        assert_eq!(replacing["unsigned"]["prev_content"], json!({}), "{replacing}");
        server.stop().await;
    }

    async fn a_filter_asking_for_the_federation_format_gets_events_as_stored(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let room = create(&server, &alice, json!({})).await;
        let sent = send(&server, &alice, &room, "t1", "as stored").await;
        let filter = json!({"event_format": "federation", "room": {"timeline": {"limit": 1}}});
        let body = sync(&server, &alice, None, Some(filter)).await;
        let event = &timeline(&body, &room)[0];
        for key in ["event_id", "room_id", "sender", "type", "content", "origin_server_ts", "prev_events",
            "auth_events", "depth", "hashes", "signatures", "unsigned"] {
            assert!(event.get(key).is_some(), "no {key} in {event}");
        }
        assert_eq!((event["event_id"].as_str(), event["content"]["body"].as_str()), (Some(sent.as_str()), Some("as stored")));
        assert_eq!(event["unsigned"]["transaction_id"], "t1", "the reader's unsigned still: {event}");
        // The client format leaves the PDU's fields out.
        let body = sync(&server, &alice, None, Some(json!({"room": {"timeline": {"limit": 1}}}))).await;
        let event = &timeline(&body, &room)[0];
        for key in ["prev_events", "auth_events", "depth", "hashes", "signatures"] {
            assert!(event.get(key).is_none(), "{key} in the client format: {event}");
        }
        server.stop().await;
    }

    async fn room_summaries_count_members_and_name_heroes_of_unnamed_rooms(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let dm = create(&server, &alice, json!({"preset": "private_chat", "invite": [bob.user_id, carol.user_id]})).await;
        join(&server, &bob, &dm).await;
        let named = create(&server, &alice, json!({"preset": "private_chat", "name": "Tea", "invite": [bob.user_id]})).await;
        let synced = sync(&server, &alice, None, None).await;
        let summary = &synced["rooms"]["join"][dm.as_str()]["summary"];
        assert_eq!(summary["m.joined_member_count"], 2, "{summary}");
        assert_eq!(summary["m.invited_member_count"], 1, "{summary}");
        let mut heroes: Vec<&str> = summary["m.heroes"].as_array().unwrap().iter().map(|h| h.as_str().unwrap()).collect();
        heroes.sort();
        assert_eq!(heroes, [bob.user_id.as_str(), carol.user_id.as_str()], "everyone but alice");
        let summary = &synced["rooms"]["join"][named.as_str()]["summary"];
        assert!(summary.get("m.heroes").is_none(), "a named room needs no heroes: {summary}");
        assert_eq!(summary["m.invited_member_count"], 1);
        // Lazy-loaded members include the heroes, so a client can show their names.
        let lazy = json!({"room": {"state": {"lazy_load_members": true}, "timeline": {"limit": 1}}});
        let synced = sync(&server, &alice, None, Some(lazy)).await;
        let members: Vec<&str> = synced["rooms"]["join"][dm.as_str()]["state"]["events"].as_array().unwrap().iter()
            .filter(|e| e["type"] == "m.room.member").map(|e| e["state_key"].as_str().unwrap()).collect();
        assert!(members.contains(&carol.user_id.as_str()) && members.contains(&bob.user_id.as_str()), "{members:?}");
        server.stop().await;
    }

    async fn filters_apply_to_state_ephemeral_account_data_presence_and_left_rooms(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat", "name": "Tea"})).await;
        let gone = create(&server, &alice, json!({"preset": "public_chat"})).await;
        let (status, _) = server.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&gone)), Some(&alice.token), json!({})).await;
        assert_eq!(status, 200);
        set_state(&server, &alice, &room, "a.madeup.state", json!({"my_key": 1})).await;
        put(&server, &alice, &format!("/_matrix/client/v3/user/{}/account_data/a.b.c", enc(&alice.user_id)), json!({"x": 1})).await;
        put(&server, &alice, &format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id)), json!({"presence": "online"})).await;

        // State only of one type; the timeline of that type holds it, so the state has none.
        let only = json!({"room": {"timeline": {"types": ["a.madeup.state"]}, "state": {"types": ["a.madeup.state"]}}});
        let synced = sync(&server, &alice, None, Some(only)).await;
        let joined = &synced["rooms"]["join"][room.as_str()];
        assert_eq!(joined["state"]["events"], json!([]), "{joined}");
        assert_eq!(joined["timeline"]["events"].as_array().unwrap().len(), 1);
        let names = json!({"room": {"state": {"types": ["m.room.name"]}, "timeline": {"limit": 1}}});
        let synced = sync(&server, &alice, None, Some(names)).await;
        let state: Vec<&str> = synced["rooms"]["join"][room.as_str()]["state"]["events"].as_array().unwrap().iter()
            .map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(state, ["m.room.name"]);

        // No timeline events at all, but word that there are some.
        let none = json!({"room": {"timeline": {"limit": 0}}});
        let synced = sync(&server, &alice, None, Some(none)).await;
        assert_eq!(synced["rooms"]["join"][room.as_str()]["timeline"]["events"], json!([]));
        assert_eq!(synced["rooms"]["join"][room.as_str()]["timeline"]["limited"], true);

        // Account data and presence by type.
        let everything = sync(&server, &alice, None, None).await;
        let types: Vec<&str> = everything["account_data"]["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert!(types.contains(&"a.b.c"), "{types:?}");
        let presence: Vec<&str> = everything["presence"]["events"].as_array().unwrap().iter().map(|e| e["sender"].as_str().unwrap()).collect();
        assert_eq!(presence, [alice.user_id.as_str()], "a user sees their own presence");
        let quiet = json!({"account_data": {"not_types": ["a.b.c"]}, "presence": {"types": []}});
        let synced = sync(&server, &alice, None, Some(quiet)).await;
        let types: Vec<&str> = synced["account_data"]["events"].as_array().map(|a| a.iter().map(|e| e["type"].as_str().unwrap()).collect()).unwrap_or_default();
        assert!(!types.contains(&"a.b.c"), "{types:?}");
        assert!(synced.get("presence").is_none_or(|p| p["events"].as_array().is_none_or(|e| e.is_empty())), "{synced}");

        // Left rooms in an initial sync only when asked for.
        assert!(everything["rooms"]["leave"].get(gone.as_str()).is_none());
        let with_left = sync(&server, &alice, None, Some(json!({"room": {"include_leave": true}}))).await;
        let left = &with_left["rooms"]["leave"][gone.as_str()];
        assert!(left["timeline"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "leave"), "{left}");
        server.stop().await;
    }

    async fn people_met_in_a_sync_come_with_their_presence(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat"})).await;
        sync(&server, &alice, None, None).await;
        sync(&server, &carol, None, None).await;
        let since = sync(&server, &bob, None, None).await["next_batch"].as_str().unwrap().to_owned();
        join(&server, &bob, &room).await;
        let met = sync(&server, &bob, Some(&since), None).await;
        let senders: Vec<&str> = met["presence"]["events"].as_array().map(|e| e.iter().map(|p| p["sender"].as_str().unwrap()).collect()).unwrap_or_default();
        assert!(senders.contains(&alice.user_id.as_str()), "bob joined alice's room: {met}");
        let since = sync(&server, &alice, None, None).await["next_batch"].as_str().unwrap().to_owned();
        join(&server, &carol, &room).await;
        let met = sync(&server, &alice, Some(&since), None).await;
        let senders: Vec<&str> = met["presence"]["events"].as_array().map(|e| e.iter().map(|p| p["sender"].as_str().unwrap()).collect()).unwrap_or_default();
        assert!(senders.contains(&carol.user_id.as_str()), "carol joined alice's room: {met}");
        server.stop().await;
    }

    async fn lazy_loaded_members_come_once_per_device_unless_redundant_ones_are_asked_for(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat", "name": "Tea"})).await;
        join(&server, &bob, &room).await;
        join(&server, &carol, &room).await;
        let members = |sync: &Value| -> Vec<String> {
            let mut found: Vec<String> = sync["rooms"]["join"][room.as_str()]["state"]["events"].as_array()
                .map(|events| events.iter().filter(|e| e["type"] == "m.room.member").map(|e| e["state_key"].as_str().unwrap().to_owned()).collect())
                .unwrap_or_default();
            found.sort();
            found
        };
        for redundant in [false, true] {
            for n in 0..2 {
                send(&server, &bob, &room, &format!("b{n}{redundant}"), "from bob").await;
            }
            let filter = json!({"room": {"timeline": {"limit": 2}, "state": {"lazy_load_members": true, "include_redundant_members": redundant}}});
            let first = sync(&server, &alice, None, Some(filter.clone())).await;
            assert_eq!(members(&first), [alice.user_id.clone(), bob.user_id.clone()], "the timeline's sender and the reader");
            let since = first["next_batch"].as_str().unwrap().to_owned();
            send(&server, &carol, &room, &format!("c{redundant}"), "from carol").await;
            send(&server, &bob, &room, &format!("b{redundant}"), "from bob again").await;
            let next = sync(&server, &alice, Some(&since), Some(filter)).await;
            let expected = match redundant {
                false => vec![carol.user_id.clone()],
                true => vec![bob.user_id.clone(), carol.user_id.clone()],
            };
            assert_eq!(members(&next), expected, "include_redundant_members: {redundant}");
        }
        server.stop().await;
    }

    async fn a_profile_change_is_not_a_new_join_and_a_room_joined_and_left_comes_whole(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat", "name": "Tea"})).await;
        let since = sync(&server, &alice, None, None).await["next_batch"].as_str().unwrap().to_owned();
        let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&alice.user_id));
        put(&server, &alice, &path, json!({"membership": "join", "displayname": "Boris"})).await;
        let next = sync(&server, &alice, Some(&since), None).await;
        let events = timeline(&next, &room);
        assert_eq!(events.len(), 1, "only the change, not the room from its start: {next}");
        assert_eq!(events[0]["content"]["displayname"], "Boris");

        let other = create(&server, &alice, json!({"preset": "public_chat", "name": "Coffee"})).await;
        let since = sync(&server, &bob, None, None).await["next_batch"].as_str().unwrap().to_owned();
        join(&server, &bob, &other).await;
        let (status, _) = server.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&other)), Some(&bob.token), json!({})).await;
        assert_eq!(status, 200);
        let left = sync(&server, &bob, Some(&since), Some(json!({"room": {"timeline": {"limit": 1}}}))).await;
        let state: Vec<&str> = left["rooms"]["leave"][other.as_str()]["state"]["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert!(state.contains(&"m.room.create") && state.contains(&"m.room.name"), "the whole state: {state:?}");
        server.stop().await;
    }

    async fn a_room_joined_after_an_invite_comes_with_its_whole_state(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create(&server, &alice, json!({"room_version": "12", "preset": "private_chat", "invite": [bob.user_id]})).await;
        let first = sync(&server, &bob, None, None).await;
        assert!(first["rooms"]["invite"].get(room.as_str()).is_some(), "{first}");
        let since = first["next_batch"].as_str().unwrap().to_owned();
        join(&server, &bob, &room).await;
        send(&server, &alice, &room, "t1", "welcome").await;
        let next = sync(&server, &bob, Some(&since), None).await;
        let joined = &next["rooms"]["join"][room.as_str()];
        let types: Vec<&str> = joined["state"]["events"].as_array().unwrap().iter()
            .chain(joined["timeline"]["events"].as_array().unwrap())
            .map(|e| e["type"].as_str().unwrap()).collect();
        assert!(types.contains(&"m.room.create"), "{joined}");
        // The room is new to the client: its timeline is marked limited, as Synapse marks it,
        // also when a filter leaves few events in it.
        assert_eq!(joined["timeline"]["limited"], true, "{joined}");
        let filter = json!({"room": {"timeline": {"types": ["m.room.message"], "limit": 10}}});
        let next = sync(&server, &bob, Some(&since), Some(filter)).await;
        let joined = &next["rooms"]["join"][room.as_str()];
        assert_eq!(timeline(&next, &room).len(), 1, "{joined}");
        assert_eq!(joined["timeline"]["limited"], true, "{joined}");
        // Once known, a room's timeline is limited only when events were left out.
        let later = sync(&server, &bob, Some(next["next_batch"].as_str().unwrap()), None).await;
        send(&server, &alice, &room, "t2", "again").await;
        let again = sync(&server, &bob, Some(later["next_batch"].as_str().unwrap()), None).await;
        assert_eq!(again["rooms"]["join"][room.as_str()]["timeline"]["limited"], false, "{again}");
        server.stop().await;
    }

    async fn who_left_and_joined_again_since_the_token_reads_only_what_history_visibility_allows(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat"})).await;
        join(&server, &bob, &room).await;
        set_state(&server, &alice, &room, "m.room.history_visibility", json!({"history_visibility": "joined"})).await;
        let since = sync(&server, &bob, None, None).await["next_batch"].as_str().unwrap().to_owned();
        let (status, body) = server.post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(&bob.token), json!({})).await;
        assert_eq!(status, 200, "{body}");
        join(&server, &carol, &room).await;
        for n in 0..3 {
            send(&server, &alice, &room, &format!("away{n}"), "said while bob was away").await;
        }
        join(&server, &bob, &room).await;
        let body = sync(&server, &bob, Some(&since), None).await;
        let joined = &body["rooms"]["join"][room.as_str()];
        let events = timeline(&body, &room);
        assert!(events.iter().all(|e| e["content"]["body"] != "said while bob was away"), "{joined}");
        // Carol's join is current state: it shows, in the timeline, as Synapse shows it.
        assert!(events.iter().any(|e| e["type"] == "m.room.member" && e["state_key"] == carol.user_id.as_str()), "{joined}");
        assert_eq!(joined["timeline"]["limited"], true, "the room is new to the client again: {joined}");
        server.stop().await;
    }

    async fn a_gapped_incremental_sync_sends_only_state_changed_since_the_token(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let room = create(&server, &alice, json!({"preset": "public_chat"})).await;
        let since = sync(&server, &alice, None, None).await["next_batch"].as_str().unwrap().to_owned();
        set_state(&server, &alice, &room, "m.room.topic", json!({"topic": "tea"})).await;
        for n in 0..12 {
            send(&server, &alice, &room, &format!("t{n}"), &format!("message {n}")).await;
        }
        let synced = sync(&server, &alice, Some(&since), None).await;
        let joined = &synced["rooms"]["join"][room.as_str()];
        assert_eq!(joined["timeline"]["limited"], true, "{joined}");
        let state: Vec<&str> = joined["state"]["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(state, ["m.room.topic"], "only what changed between the token and the timeline");
        server.stop().await;
    }
}
