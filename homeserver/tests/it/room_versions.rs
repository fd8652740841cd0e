//! Room versions 1 to 12 and room upgrades.

use serde_json::{Value, json};

use crate::common::{
    Db, Session, TestServer, assert_error, create_room as create, enc, join_room as join, put_ok as put,
    put_state, send_text as send,
};

const PW: &str = "correct horse battery";

async fn get_state(server: &TestServer, who: &Session, room: &str, kind: &str) -> (u16, Value) {
    server.get(&format!("/_matrix/client/v3/rooms/{}/state/{kind}/", enc(room)), Some(&who.token)).await
}

async fn full_state(server: &TestServer, who: &Session, room: &str) -> Vec<Value> {
    let (status, state) =
        server.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(room)), Some(&who.token)).await;
    assert_eq!(status, 200, "{state}");
    state.as_array().unwrap().clone()
}

/// The bodies of a room's messages, oldest first, as `who` pages back through them.
async fn bodies(server: &TestServer, who: &Session, room: &str) -> Vec<String> {
    let (status, page) = server
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100", enc(room)), Some(&who.token))
        .await;
    assert_eq!(status, 200, "{page}");
    let mut bodies: Vec<String> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap_or("<redacted>").to_owned())
        .collect();
    bodies.reverse();
    bodies
}

crate::on_both_backends! {
    async fn every_room_version_from_1_to_12_hosts_a_working_room(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        for version in 1..=12 {
            let version = version.to_string();
            let room = create(&server, &alice, json!({"room_version": version, "preset": "public_chat", "name": "v"})).await;
            let (_, create_event) = get_state(&server, &alice, &room, "m.room.create").await;
            assert_eq!(create_event["room_version"], version.as_str());
            assert_eq!(create_event.get("creator").is_some(), version.parse::<u32>().unwrap() < 11,
                "creator in the content before version 11: {create_event}");
            let state = full_state(&server, &alice, &room).await;
            let create_id = state.iter().find(|e| e["type"] == "m.room.create").unwrap()["event_id"].as_str().unwrap().to_owned();
            assert!(state.iter().all(|e| e["room_id"] == room.as_str()), "every event names its room, the create event too");
            match version.as_str() {
                "1" | "2" => assert!(create_id.ends_with(":localhost"), "v{version} ids are chosen by the server: {create_id}"),
                "12" => {
                    assert_eq!(room, format!("!{}", &create_id[1..]), "the room id is the create event's hash");
                }
                _ => {
                    assert!(!create_id.contains(':'), "v{version} ids are hashes: {create_id}");
                    assert!(room.ends_with(":localhost"), "{room}");
                }
            }

            let (status, joined) = join(&server, &bob, &room).await;
            assert_eq!(status, 200, "bob joins v{version}: {joined}");
            send(&server, &alice, &room, &format!("a{version}"), "hello").await;
            let secret = send(&server, &bob, &room, &format!("b{version}"), "secret").await;
            put_state(&server, &alice, &room, "m.room.topic", "", json!({"topic": "tea"})).await;
            // Alice gives bob moderator rights, who then redacts his own message and kicks no one
            // he may not.
            let (_, mut levels) = get_state(&server, &alice, &room, "m.room.power_levels").await;
            levels["users"][bob.user_id.as_str()] = 50.into();
            put_state(&server, &alice, &room, "m.room.power_levels", "", levels).await;
            let path = format!("/_matrix/client/v3/rooms/{}/redact/{}/r{version}", enc(&room), enc(&secret));
            put(&server, &bob, &path, json!({"reason": "oops"})).await;
            let kick = server.post(&format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)), Some(&bob.token),
                json!({"user_id": alice.user_id})).await;
            assert_error(&kick, 403, "M_FORBIDDEN");
            assert_eq!(bodies(&server, &bob, &room).await, ["hello", "<redacted>"], "v{version}");
            let (status, sync) = server.get("/_matrix/client/v3/sync", Some(&bob.token)).await;
            assert_eq!(status, 200);
            let timeline = &sync["rooms"]["join"][room.as_str()]["timeline"]["events"];
            assert!(timeline.as_array().unwrap().iter().any(|e| e["content"]["topic"] == "tea"), "v{version}: {timeline}");
        }
        server.stop().await;
    }

    async fn unknown_room_versions_are_refused_and_capabilities_list_every_known_one(db: Db) {
        let server = TestServer::start_with(db, |c| c.rooms.default_version = "12".to_owned()).await;
        let alice = server.register("alice", PW).await;
        // Versions unknown here, and names that are not even versions' names, alike.
        for version in ["13", "0", "org.example.v1", "", "my_bad_version"] {
            let refused = server.post("/_matrix/client/v3/createRoom", Some(&alice.token),
                json!({"room_version": version})).await;
            assert_error(&refused, 400, "M_UNSUPPORTED_ROOM_VERSION");
        }
        let refused = server.post("/_matrix/client/v3/createRoom", Some(&alice.token), json!({"room_version": "13"})).await;
        assert_error(&refused, 400, "M_UNSUPPORTED_ROOM_VERSION");
        let (status, caps) = server.get("/_matrix/client/v3/capabilities", Some(&alice.token)).await;
        assert_eq!(status, 200);
        let versions = &caps["capabilities"]["m.room_versions"];
        assert_eq!(versions["default"], "12", "the configured default");
        for version in 1..=12 {
            assert_eq!(versions["available"][version.to_string()], "stable", "{versions}");
        }
        let room = create(&server, &alice, json!({})).await;
        let (_, create_event) = get_state(&server, &alice, &room, "m.room.create").await;
        assert_eq!(create_event["room_version"], "12", "rooms created without a version get the default");
        server.stop().await;
    }

    async fn version_12_creators_outrank_everyone_and_stay_out_of_power_levels(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = create(&server, &alice, json!({"room_version": "12", "preset": "trusted_private_chat",
            "invite": [bob.user_id]})).await;
        let (_, create_event) = get_state(&server, &alice, &room, "m.room.create").await;
        assert_eq!(create_event["additional_creators"], json!([bob.user_id]), "invitees of a trusted chat are creators");
        let (_, levels) = get_state(&server, &alice, &room, "m.room.power_levels").await;
        assert!(levels["users"].get(alice.user_id.as_str()).is_none() && levels["users"].get(bob.user_id.as_str()).is_none(),
            "creators are not listed: {levels}");
        assert_eq!(levels["events"]["m.room.tombstone"], 150, "only creators may upgrade: {levels}");
        assert_eq!(join(&server, &bob, &room).await.0, 200);
        // Bob, a creator with no listed level, may change power levels; listing a creator is refused.
        let mut raised = levels.clone();
        raised["users"][carol.user_id.as_str()] = 100.into();
        put_state(&server, &bob, &room, "m.room.power_levels", "", raised.clone()).await;
        raised["users"][alice.user_id.as_str()] = 100.into();
        let path = format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels/", enc(&room));
        let refused = server.request("PUT", &path, Some(&bob.token), Some(raised)).await;
        assert_error(&refused, 403, "M_FORBIDDEN");

        let listed = server.post("/_matrix/client/v3/createRoom", Some(&alice.token), json!({"room_version": "12",
            "power_level_content_override": {"users": {alice.user_id.clone(): 100}}})).await;
        assert_error(&listed, 400, "M_BAD_JSON");
        let bad = server.post("/_matrix/client/v3/createRoom", Some(&alice.token), json!({"room_version": "12",
            "creation_content": {"additional_creators": ["not a user"]}})).await;
        assert_error(&bad, 400, "M_BAD_JSON");
        let extra = create(&server, &alice, json!({"room_version": "12", "creation_content": {"additional_creators": [carol.user_id]}})).await;
        let (_, create_event) = get_state(&server, &alice, &extra, "m.room.create").await;
        assert_eq!(create_event["additional_creators"], json!([carol.user_id]));
        server.stop().await;
    }

    async fn upgrading_a_room_carries_its_state_and_tombstones_the_old_one(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let old = create(&server, &alice, json!({"room_version": "10", "preset": "public_chat", "visibility": "public",
            "room_alias_name": "tea", "name": "Tea house", "topic": "all things tea"})).await;
        assert_eq!(join(&server, &bob, &old).await.0, 200);
        assert_eq!(join(&server, &carol, &old).await.0, 200);
        let banned = server.post(&format!("/_matrix/client/v3/rooms/{}/ban", enc(&old)), Some(&alice.token),
            json!({"user_id": carol.user_id, "reason": "spam"})).await;
        assert_eq!(banned.0, 200, "{}", banned.1);
        put_state(&server, &alice, &old, "m.room.encryption", "", json!({"algorithm": "m.megolm.v1.aes-sha2"})).await;
        let last = send(&server, &bob, &old, "t1", "before the upgrade").await;
        put(&server, &alice, &format!("/_matrix/client/v3/user/{}/account_data/m.direct", enc(&alice.user_id)),
            json!({bob.user_id.clone(): [old]})).await;
        put(&server, &alice, &format!("/_matrix/client/v3/user/{}/rooms/{}/tags/m.favourite", enc(&alice.user_id), enc(&old)),
            json!({"order": 0.5})).await;
        // Bob's own tag and direct chat for the old room, which follow him when he joins the new one.
        put(&server, &bob, &format!("/_matrix/client/v3/user/{}/rooms/{}/tags/u.work", enc(&bob.user_id), enc(&old)),
            json!({"order": 0.25})).await;
        put(&server, &bob, &format!("/_matrix/client/v3/user/{}/account_data/m.direct", enc(&bob.user_id)),
            json!({alice.user_id.clone(): [old]})).await;

        let (status, upgraded) = server.post(&format!("/_matrix/client/v3/rooms/{}/upgrade", enc(&old)),
            Some(&alice.token), json!({"new_version": "12"})).await;
        assert_eq!(status, 200, "{upgraded}");
        let new = upgraded["replacement_room"].as_str().unwrap().to_owned();
        assert!(!new.contains(':'), "a version 12 room id: {new}");

        let (_, tombstone) = get_state(&server, &bob, &old, "m.room.tombstone").await;
        assert_eq!(tombstone["replacement_room"], new.as_str());
        let (_, create_event) = get_state(&server, &alice, &new, "m.room.create").await;
        assert_eq!(create_event["room_version"], "12");
        assert_eq!(create_event["predecessor"]["room_id"], old.as_str());
        let (_, name) = get_state(&server, &alice, &new, "m.room.name").await;
        assert_eq!(name["name"], "Tea house");
        let (_, topic) = get_state(&server, &alice, &new, "m.room.topic").await;
        assert_eq!(topic["topic"], "all things tea");
        let (_, encryption) = get_state(&server, &alice, &new, "m.room.encryption").await;
        assert_eq!(encryption["algorithm"], "m.megolm.v1.aes-sha2");
        let (_, levels) = get_state(&server, &alice, &new, "m.room.power_levels").await;
        assert!(levels["users"].get(alice.user_id.as_str()).is_none(), "the upgrader is a creator of a v12 room: {levels}");
        let (_, carol_member) = server.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&new), enc(&carol.user_id)), Some(&alice.token)).await;
        assert_eq!(carol_member["membership"], "ban", "bans carry over");

        let (status, resolved) = server.get("/_matrix/client/v3/directory/room/%23tea%3Alocalhost", None).await;
        assert_eq!(status, 200);
        assert_eq!(resolved["room_id"], new.as_str(), "the alias moved");
        let (_, canonical) = get_state(&server, &alice, &new, "m.room.canonical_alias").await;
        assert_eq!(canonical["alias"], "#tea:localhost");
        let (_, public) = server.get("/_matrix/client/v3/publicRooms", None).await;
        let listed: Vec<&str> = public["chunk"].as_array().unwrap().iter().map(|r| r["room_id"].as_str().unwrap()).collect();
        assert_eq!(listed, [new.as_str()], "the directory lists the new room instead of the old");

        // The upgrader's direct chats and tags follow the room.
        let (_, direct) = server.get(&format!("/_matrix/client/v3/user/{}/account_data/m.direct", enc(&alice.user_id)), Some(&alice.token)).await;
        assert_eq!(direct[bob.user_id.as_str()], json!([old, new]), "{direct}");
        let (_, tags) = server.get(&format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(&alice.user_id), enc(&new)), Some(&alice.token)).await;
        assert_eq!(tags["tags"]["m.favourite"]["order"], 0.5, "{tags}");

        // Members follow: bob joins the new room, and his tags and direct chat with it; in the old
        // one only moderators may still speak.
        let (_, tags) = server.get(&format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(&bob.user_id), enc(&new)), Some(&bob.token)).await;
        assert_eq!(tags["tags"], json!({}), "nothing moves before he joins: {tags}");
        assert_eq!(join(&server, &bob, &new).await.0, 200);
        let (_, tags) = server.get(&format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(&bob.user_id), enc(&new)), Some(&bob.token)).await;
        assert_eq!(tags["tags"]["u.work"]["order"], 0.25, "{tags}");
        let (_, direct) = server.get(&format!("/_matrix/client/v3/user/{}/account_data/m.direct", enc(&bob.user_id)), Some(&bob.token)).await;
        assert_eq!(direct[alice.user_id.as_str()], json!([old, new]), "{direct}");
        send(&server, &bob, &new, "t2", "after the upgrade").await;
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t3", enc(&old));
        let refused = server.request("PUT", &path, Some(&bob.token), Some(json!({"msgtype": "m.text", "body": "x"}))).await;
        assert_error(&refused, 403, "M_FORBIDDEN");
        let (status, sync) = server.get("/_matrix/client/v3/sync", Some(&bob.token)).await;
        assert_eq!(status, 200);
        assert!(sync["rooms"]["join"].get(new.as_str()).is_some());
        assert_eq!(create_event["predecessor"]["event_id"], last.as_str(), "a v12 room cannot name the tombstone that names it, but its last event before");
        server.stop().await;
    }

    async fn upgrades_need_power_membership_and_a_known_version(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let carol = server.register("carol", PW).await;
        let room = create(&server, &alice, json!({"room_version": "1", "preset": "public_chat"})).await;
        assert_eq!(join(&server, &bob, &room).await.0, 200);
        let upgrade = |who: &Session, room: &str, body: Value| {
            let path = format!("/_matrix/client/v3/rooms/{}/upgrade", enc(room));
            let token = who.token.clone();
            let server = &server;
            async move { server.post(&path, Some(&token), body).await }
        };
        assert_error(&upgrade(&bob, &room, json!({"new_version": "11"})).await, 403, "M_FORBIDDEN");
        assert_error(&upgrade(&carol, &room, json!({"new_version": "11"})).await, 403, "M_FORBIDDEN");
        assert_error(&upgrade(&alice, &room, json!({"new_version": "99"})).await, 400, "M_UNSUPPORTED_ROOM_VERSION");
        assert_error(&upgrade(&alice, &room, json!({"new_version": "my_bad_version"})).await, 400, "M_UNSUPPORTED_ROOM_VERSION");
        assert_error(&upgrade(&alice, "!nowhere:localhost", json!({"new_version": "11"})).await, 404, "M_NOT_FOUND");
        assert_eq!(upgrade(&alice, &room, json!({})).await.0, 400);
        // From version 1 (string power levels allowed) to 11 (integers only).
        let (_, mut levels) = get_state(&server, &alice, &room, "m.room.power_levels").await;
        levels["users"][bob.user_id.as_str()] = "20".into();
        put_state(&server, &alice, &room, "m.room.power_levels", "", levels).await;
        let (status, upgraded) = upgrade(&alice, &room, json!({"new_version": "11"})).await;
        assert_eq!(status, 200, "{upgraded}");
        let new = upgraded["replacement_room"].as_str().unwrap().to_owned();
        let (_, levels) = get_state(&server, &alice, &new, "m.room.power_levels").await;
        assert_eq!(levels["users"][bob.user_id.as_str()], 20, "numeric strings become integers: {levels}");
        // Below version 12 the new room names the tombstone as its predecessor's last event.
        let (_, tombstone) = server.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.tombstone/?format=event", enc(&room)), Some(&alice.token)).await;
        let (_, create_event) = get_state(&server, &alice, &new, "m.room.create").await;
        assert_eq!(create_event["predecessor"]["event_id"], tombstone["event_id"], "{tombstone}");
        assert_eq!(levels["users"][alice.user_id.as_str()], 100);
        server.stop().await;
    }
}
