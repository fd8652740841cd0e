//! Aliases, the public room directory, the user directory and TURN credentials.

use serde_json::json;

use crate::common::{Db, Session, TestServer, assert_error};

const PW: &str = "correct horse battery";

fn enc(s: &str) -> String {
    s.replace('!', "%21").replace(':', "%3A").replace('#', "%23").replace('@', "%40")
}

async fn create_room(server: &TestServer, who: &Session, body: serde_json::Value) -> String {
    let (status, created) = server.post("/_matrix/client/v3/createRoom", Some(&who.token), body).await;
    assert_eq!(status, 200, "{created}");
    created["room_id"].as_str().unwrap().to_owned()
}

async fn join(server: &TestServer, who: &Session, room: &str) {
    let (status, body) =
        server.post(&format!("/_matrix/client/v3/join/{}", enc(room)), Some(&who.token), json!({})).await;
    assert_eq!(status, 200, "{body}");
}

/// Alice's neighbourhood: bob shares a private room with her, carol and dave share one without
/// her, erin sits in a public room, frank left the room he shared with her. Returns the ids
/// a search for "pal" finds as alice.
async fn directory_as_alice(server: &TestServer) -> Vec<String> {
    let alice = server.register("alice", PW).await;
    let bob = server.register("pal_bob", PW).await;
    let carol = server.register("pal_carol", PW).await;
    let dave = server.register("pal_dave", PW).await;
    let erin = server.register("pal_erin", PW).await;
    let frank = server.register("pal_frank", PW).await;
    let shared = create_room(
        server,
        &alice,
        json!({"preset": "private_chat", "invite": [bob.user_id, frank.user_id]}),
    )
    .await;
    join(server, &bob, &shared).await;
    join(server, &frank, &shared).await;
    let (status, left) = server
        .post(&format!("/_matrix/client/v3/rooms/{}/leave", enc(&shared)), Some(&frank.token), json!({}))
        .await;
    assert_eq!(status, 200, "{left}");
    let private =
        create_room(server, &carol, json!({"preset": "private_chat", "invite": [dave.user_id]})).await;
    join(server, &dave, &private).await;
    create_room(server, &erin, json!({"preset": "public_chat"})).await;

    let (status, found) = server
        .post("/_matrix/client/v3/user_directory/search", Some(&alice.token), json!({"search_term": "pal"}))
        .await;
    assert_eq!(status, 200, "{found}");
    found["results"].as_array().unwrap().iter().map(|u| u["user_id"].as_str().unwrap().to_owned()).collect()
}

crate::on_both_backends! {
    async fn user_directory_finds_only_people_one_can_meet(db: Db) {
        let server = TestServer::start(db).await;
        assert_eq!(directory_as_alice(&server).await, ["@pal_bob:localhost", "@pal_erin:localhost"],
            "a shared room or a public room: not carol and dave's private room, not frank who left");
        server.stop().await;

        let open = TestServer::start_with(db, |c| c.user_directory.search_all_users = true).await;
        assert_eq!(directory_as_alice(&open).await.len(), 5, "search_all_users finds everyone");
        open.stop().await;
    }

    async fn searchers_find_themselves_only_through_public_or_world_readable_rooms(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = create_room(&server, &alice, json!({"preset": "private_chat", "invite": [bob.user_id]})).await;
        join(&server, &bob, &room).await;
        let search = |who: &Session, term: &str| {
            let (token, term) = (who.token.clone(), term.to_owned());
            let server = &server;
            async move {
                let (status, found) = server.post("/_matrix/client/v3/user_directory/search", Some(&token),
                    json!({"search_term": term})).await;
                assert_eq!(status, 200, "{found}");
                found["results"].as_array().unwrap().iter().map(|u| u["user_id"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
            }
        };
        assert_eq!(search(&bob, "bob").await, Vec::<String>::new(), "a private room shared with others does not list bob to himself");
        assert_eq!(search(&alice, "bob").await, ["@bob:localhost"], "but to alice");
        let (status, _) = server.request("PUT", &format!("/_matrix/client/v3/rooms/{}/state/m.room.history_visibility/", room.replace('!', "%21").replace(':', "%3A")),
            Some(&alice.token), Some(json!({"history_visibility": "world_readable"}))).await;
        assert_eq!(status, 200);
        assert_eq!(search(&bob, "bob").await, ["@bob:localhost"], "a world-readable room is public");
        server.stop().await;
    }

    async fn aliases_and_public_rooms(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let (status, created) = server.post("/_matrix/client/v3/createRoom", Some(&alice.token),
            json!({"preset": "public_chat", "visibility": "public", "room_alias_name": "tea", "name": "Tea house", "topic": "all things tea"})).await;
        assert_eq!(status, 200, "{created}");
        let room = created["room_id"].as_str().unwrap().to_owned();
        let taken = server.post("/_matrix/client/v3/createRoom", Some(&alice.token), json!({"room_alias_name": "tea"})).await;
        assert_error(&taken, 400, "M_ROOM_IN_USE");

        let (status, resolved) = server.get(&format!("/_matrix/client/v3/directory/room/{}", enc("#tea:localhost")), None).await;
        assert_eq!((status, resolved["room_id"].as_str()), (200, Some(room.as_str())));
        // Bob joins by alias.
        let (status, joined) = server.post(&format!("/_matrix/client/v3/join/{}", enc("#tea:localhost")), Some(&bob.token), json!({})).await;
        assert_eq!((status, joined["room_id"].as_str()), (200, Some(room.as_str())), "{joined}");

        // More aliases, listed and removed.
        let second = format!("/_matrix/client/v3/directory/room/{}", enc("#chai:localhost"));
        assert_eq!(server.request("PUT", &second, Some(&bob.token), Some(json!({"room_id": room}))).await.0, 200);
        let (_, aliases) = server.get(&format!("/_matrix/client/v3/rooms/{}/aliases", enc(&room)), Some(&alice.token)).await;
        assert_eq!(aliases["aliases"], json!(["#chai:localhost", "#tea:localhost"]));
        assert_error(&server.request("PUT", &second, Some(&alice.token), Some(json!({"room_id": room}))).await, 400, "M_ROOM_IN_USE");
        let foreign = format!("/_matrix/client/v3/directory/room/{}", enc("#x:elsewhere.org"));
        assert_error(&server.request("PUT", &foreign, Some(&alice.token), Some(json!({"room_id": room}))).await, 400, "M_INVALID_PARAM");
        let tea = format!("/_matrix/client/v3/directory/room/{}", enc("#tea:localhost"));
        assert_error(&server.request("DELETE", &tea, Some(&bob.token), None).await, 403, "M_FORBIDDEN");
        assert_eq!(server.request("DELETE", &second, Some(&bob.token), None).await.0, 200, "the creator may remove it");
        assert_error(&server.get(&second, None).await, 404, "M_NOT_FOUND");

        // The directory.
        let (status, list) = server.get("/_matrix/client/v3/publicRooms", None).await;
        assert_eq!(status, 200, "{list}");
        let entry = &list["chunk"][0];
        assert_eq!((entry["room_id"].as_str(), entry["name"].as_str()), (Some(room.as_str()), Some("Tea house")));
        assert_eq!(entry["num_joined_members"], 2);
        assert_eq!(entry["canonical_alias"], "#tea:localhost");
        let (_, found) = server.post("/_matrix/client/v3/publicRooms", Some(&bob.token), json!({"filter": {"generic_search_term": "TEA"}})).await;
        assert_eq!(found["chunk"].as_array().unwrap().len(), 1);
        let (_, none) = server.post("/_matrix/client/v3/publicRooms", Some(&bob.token), json!({"filter": {"generic_search_term": "coffee"}})).await;
        assert_eq!(none["chunk"].as_array().unwrap().len(), 0);
        let listing = format!("/_matrix/client/v3/directory/list/room/{}", enc(&room));
        assert_eq!(server.get(&listing, None).await.1["visibility"], "public");
        assert_error(&server.request("PUT", &listing, Some(&bob.token), Some(json!({"visibility": "private"}))).await, 403, "M_FORBIDDEN");
        assert_eq!(server.request("PUT", &listing, Some(&alice.token), Some(json!({"visibility": "private"}))).await.0, 200);
        assert_eq!(server.get("/_matrix/client/v3/publicRooms", None).await.1["chunk"], json!([]));
        assert_error(&server.get("/_matrix/client/v3/publicRooms?since=bogus", None).await, 400, "M_INVALID_PARAM");
        server.stop().await;
    }

    async fn user_directory_and_turn(db: Db) {
        let server = TestServer::start_with(db, |c| {
            c.turn.uris = vec!["turn:turn.localhost:3478?transport=udp".to_owned()];
            c.turn.shared_secret = homeserver::config::Secret("turn-secret".to_owned());
        }).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bobby_tables", PW).await;
        let room = create_room(&server, &alice, json!({"invite": [bob.user_id]})).await;
        join(&server, &bob, &room).await;
        let name = format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob.user_id));
        assert_eq!(server.request("PUT", &name, Some(&bob.token), Some(json!({"displayname": "Robert"}))).await.0, 200);
        let search = |term: &str| server.post("/_matrix/client/v3/user_directory/search", Some(&alice.token), json!({"search_term": term}));
        let (status, found) = search("rob").await;
        assert_eq!(status, 200, "{found}");
        assert_eq!(found["results"][0]["user_id"], bob.user_id.as_str());
        assert_eq!(found["results"][0]["display_name"], "Robert");
        assert_eq!(search("by_t").await.1["results"].as_array().unwrap().len(), 1, "an underscore matches only itself");
        assert_eq!(search("%").await.1["results"].as_array().unwrap().len(), 0, "wildcards match literally");
        assert_error(&search("").await, 400, "M_INVALID_PARAM");

        let (status, turn) = server.get("/_matrix/client/v3/voip/turnServer", Some(&alice.token)).await;
        assert_eq!(status, 200, "{turn}");
        let username = turn["username"].as_str().unwrap();
        assert!(username.ends_with(":@alice:localhost"));
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(b"turn-secret").unwrap();
        mac.update(username.as_bytes());
        use base64::Engine;
        let expected = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        assert_eq!(turn["password"], expected.as_str(), "coturn's REST-API credential scheme");
        assert_eq!(turn["ttl"], 86400);
        server.stop().await;

        let bare = TestServer::start(db).await;
        let carol = bare.register("carol", PW).await;
        assert_error(&bare.get("/_matrix/client/v3/voip/turnServer", Some(&carol.token)).await, 404, "M_NOT_FOUND");
        bare.stop().await;
    }
}
