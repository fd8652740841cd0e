//! Around the room: profiles, typing, receipts, account data, filters, push rules, presence.

use serde_json::{Value, json};

use crate::common::{Db, Session, TestServer, assert_error};

const PW: &str = "correct horse battery";

fn enc(s: &str) -> String {
    s.replace('!', "%21").replace(':', "%3A").replace('$', "%24").replace('@', "%40")
}

async fn shared_room(server: &TestServer, alice: &Session, bob: &Session) -> String {
    let (_, created) = server
        .post("/_matrix/client/v3/createRoom", Some(&alice.token), json!({"invite": [bob.user_id]}))
        .await;
    let room = created["room_id"].as_str().unwrap().to_owned();
    assert_eq!(
        server
            .post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&room)), Some(&bob.token), json!({}))
            .await
            .0,
        200
    );
    room
}

async fn sync(server: &TestServer, who: &Session, since: Option<&str>) -> Value {
    let path = match since {
        Some(since) => format!("/_matrix/client/v3/sync?since={since}&timeout=0"),
        None => "/_matrix/client/v3/sync".to_owned(),
    };
    server.get(&path, Some(&who.token)).await.1
}

fn ephemeral<'a>(sync: &'a Value, room: &str, kind: &str) -> Option<&'a Value> {
    sync["rooms"]["join"][room]["ephemeral"]["events"].as_array()?.iter().find(|e| e["type"] == kind)
}

crate::on_both_backends! {
    async fn profiles_typing_receipts(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = shared_room(&server, &alice, &bob).await;
        let since = sync(&server, &bob, None).await["next_batch"].as_str().unwrap().to_owned();

        // A new display name reaches the room as a member event.
        let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id));
        assert_eq!(server.request("PUT", &path, Some(&alice.token), Some(json!({"displayname": "Alice A."}))).await.0, 200);
        assert_eq!(server.get(&path, None).await.1["displayname"], "Alice A.");
        let profile = server.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), None).await.1;
        assert_eq!(profile["displayname"], "Alice A.");
        let update = sync(&server, &bob, Some(&since)).await;
        let events = update["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap();
        assert!(events.iter().any(|e| e["type"] == "m.room.member" && e["content"]["displayname"] == "Alice A."), "{update}");
        let since = update["next_batch"].as_str().unwrap().to_owned();
        assert_error(&server.request("PUT", &path, Some(&bob.token), Some(json!({"displayname": "x"}))).await, 403, "M_FORBIDDEN");
        assert_error(&server.request("PUT", &path, Some(&alice.token), Some(json!({"displayname": "x".repeat(300)}))).await, 400, "M_INVALID_PARAM");
        assert_error(&server.get("/_matrix/client/v3/profile/%40nobody%3Alocalhost", None).await, 404, "M_NOT_FOUND");
        // Avatars are kept as set, mxc:// or not (as Synapse), up to 1000 bytes.
        let avatar = format!("/_matrix/client/v3/profile/{}/avatar_url", enc(&alice.user_id));
        for url in ["mxc://localhost/abc", "https://example.org/pic.png", "LemurLover"] {
            assert_eq!(server.request("PUT", &avatar, Some(&alice.token), Some(json!({"avatar_url": url}))).await.0, 200);
            assert_eq!(server.get(&avatar, None).await.1["avatar_url"], url);
        }
        let long = format!("https://example.org/{}", "p".repeat(1000));
        let set = server.request("PUT", &avatar, Some(&alice.token), Some(json!({"avatar_url": long}))).await;
        assert_error(&set, 400, "M_INVALID_PARAM");
        let since = sync(&server, &bob, Some(&since)).await["next_batch"].as_str().unwrap().to_owned();

        // Typing.
        let typing = format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&alice.user_id));
        assert_eq!(server.request("PUT", &typing, Some(&alice.token), Some(json!({"typing": true, "timeout": 10000}))).await.0, 200);
        let update = sync(&server, &bob, Some(&since)).await;
        assert_eq!(ephemeral(&update, &room, "m.typing").unwrap()["content"]["user_ids"], json!([alice.user_id]));
        let since = update["next_batch"].as_str().unwrap().to_owned();
        assert_eq!(server.request("PUT", &typing, Some(&alice.token), Some(json!({"typing": false}))).await.0, 200);
        let update = sync(&server, &bob, Some(&since)).await;
        assert_eq!(ephemeral(&update, &room, "m.typing").unwrap()["content"]["user_ids"], json!([]));
        let since = update["next_batch"].as_str().unwrap().to_owned();
        assert_error(&server.request("PUT", &typing, Some(&bob.token), Some(json!({"typing": true, "timeout": 1000}))).await, 403, "M_FORBIDDEN");

        // Receipts: public ones reach others, private ones only their owner.
        let (_, sent) = server.request("PUT", &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t1", enc(&room)),
            Some(&bob.token), Some(json!({"msgtype": "m.text", "body": "read me"}))).await;
        let event = sent["event_id"].as_str().unwrap();
        let receipt = |kind: &str| format!("/_matrix/client/v3/rooms/{}/receipt/{kind}/{}", enc(&room), enc(event));
        assert_eq!(server.post(&receipt("m.read"), Some(&alice.token), json!({})).await.0, 200);
        assert_eq!(server.post(&receipt("m.read.private"), Some(&alice.token), json!({})).await.0, 200);
        let update = sync(&server, &bob, Some(&since)).await;
        let receipts = &ephemeral(&update, &room, "m.receipt").unwrap()["content"][event];
        assert!(receipts["m.read"][&alice.user_id]["ts"].is_i64(), "{update}");
        assert!(receipts.get("m.read.private").is_none(), "private receipts stay private");
        let mine = sync(&server, &alice, None).await;
        assert!(ephemeral(&mine, &room, "m.receipt").unwrap()["content"][event]["m.read.private"][&alice.user_id].is_object());
        let markers = format!("/_matrix/client/v3/rooms/{}/read_markers", enc(&room));
        assert_eq!(server.post(&markers, Some(&alice.token), json!({"m.fully_read": event, "m.read": event})).await.0, 200);
        let bogus = format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc("$nope"));
        assert_error(&server.post(&bogus, Some(&alice.token), json!({})).await, 404, "M_NOT_FOUND");
        server.stop().await;
    }

    async fn account_data_filters_push_presence(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = shared_room(&server, &alice, &bob).await;
        let since = sync(&server, &alice, None).await["next_batch"].as_str().unwrap().to_owned();
        let global = format!("/_matrix/client/v3/user/{}/account_data/org.example.settings", enc(&alice.user_id));
        assert_eq!(server.request("PUT", &global, Some(&alice.token), Some(json!({"theme": "dark"}))).await.0, 200);
        assert_eq!(server.get(&global, Some(&alice.token)).await.1, json!({"theme": "dark"}));
        let tags = format!("/_matrix/client/v3/user/{}/rooms/{}/account_data/m.tag", enc(&alice.user_id), enc(&room));
        assert_eq!(server.request("PUT", &tags, Some(&alice.token), Some(json!({"tags": {"m.favourite": {}}}))).await.0, 200);
        let update = sync(&server, &alice, Some(&since)).await;
        assert!(update["account_data"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "org.example.settings" && e["content"]["theme"] == "dark"));
        assert!(update["rooms"]["join"][&room]["account_data"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.tag"));
        assert_error(&server.get(&global, Some(&bob.token)).await, 403, "M_FORBIDDEN");
        let missing = format!("/_matrix/client/v3/user/{}/account_data/org.example.none", enc(&alice.user_id));
        assert_error(&server.get(&missing, Some(&alice.token)).await, 404, "M_NOT_FOUND");

        // Filters, used by id.
        let filters = format!("/_matrix/client/v3/user/{}/filter", enc(&alice.user_id));
        let (status, created) = server.post(&filters, Some(&alice.token), json!({"room": {"timeline": {"limit": 2}}})).await;
        assert_eq!(status, 200, "{created}");
        let id = created["filter_id"].as_str().unwrap().to_owned();
        assert_eq!(server.get(&format!("{filters}/{id}"), Some(&alice.token)).await.1["room"]["timeline"]["limit"], 2);
        let (_, limited) = server.get(&format!("/_matrix/client/v3/sync?filter={id}"), Some(&alice.token)).await;
        let timeline = &limited["rooms"]["join"][&room]["timeline"];
        assert_eq!(timeline["events"].as_array().unwrap().len(), 2);
        assert_eq!(timeline["limited"], true);
        assert_error(&server.get(&format!("{filters}/999"), Some(&alice.token)).await, 404, "M_NOT_FOUND");
        // Lazy-loaded members: only the timeline's senders come with the state (in a named room:
        // an unnamed one also sends the members it is named after).
        let (status, _) = server.request("PUT", &format!("/_matrix/client/v3/rooms/{}/state/m.room.name/", enc(&room)),
            Some(&alice.token), Some(json!({"name": "Settings"}))).await;
        assert_eq!(status, 200);
        server.request("PUT", &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/lz", enc(&room)), Some(&alice.token),
            Some(json!({"msgtype": "m.text", "body": "just me"}))).await;
        let lazy = "%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A1%7D%2C%22state%22%3A%7B%22lazy_load_members%22%3Atrue%7D%7D%7D";
        let (_, lazy_sync) = server.get(&format!("/_matrix/client/v3/sync?filter={lazy}"), Some(&alice.token)).await;
        let members: Vec<&str> = lazy_sync["rooms"]["join"][&room]["state"]["events"].as_array().unwrap().iter()
            .filter(|e| e["type"] == "m.room.member").filter_map(|e| e["state_key"].as_str()).collect();
        assert_eq!(members, [alice.user_id.as_str()], "{lazy_sync}");
        let eager = "%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A1%7D%7D%7D";
        let (_, full_sync) = server.get(&format!("/_matrix/client/v3/sync?filter={eager}"), Some(&alice.token)).await;
        let all_members = full_sync["rooms"]["join"][&room]["state"]["events"].as_array().unwrap().iter()
            .filter(|e| e["type"] == "m.room.member").count();
        assert_eq!(all_members, 2, "without lazy loading every member comes");

        // Push rules: the server's defaults, then the user's own changes.
        let (status, rules) = server.get("/_matrix/client/v3/pushrules/", Some(&alice.token)).await;
        assert_eq!(status, 200);
        assert!(rules["global"]["override"].as_array().unwrap().iter().any(|r| r["rule_id"] == ".m.rule.master"));
        let initial = sync(&server, &alice, None).await;
        assert!(initial["account_data"]["events"].as_array().unwrap().iter().any(|e| e["type"] == "m.push_rules"));
        let rule = "/_matrix/client/v3/pushrules/global/content/tea";
        let body = json!({"pattern": "tea", "actions": ["notify", {"set_tweak": "highlight"}]});
        assert_eq!(server.request("PUT", rule, Some(&alice.token), Some(body)).await.0, 200);
        assert_eq!(server.get(rule, Some(&alice.token)).await.1["pattern"], "tea");
        assert_eq!(server.request("PUT", &format!("{rule}/enabled"), Some(&alice.token), Some(json!({"enabled": false}))).await.0, 200);
        assert_eq!(server.get(&format!("{rule}/enabled"), Some(&alice.token)).await.1["enabled"], false);
        assert_eq!(server.request("PUT", &format!("{rule}/actions"), Some(&alice.token), Some(json!({"actions": []}))).await.0, 200);
        assert_eq!(server.get(&format!("{rule}/actions"), Some(&alice.token)).await.1["actions"], json!([]));
        assert_eq!(server.request("DELETE", rule, Some(&alice.token), None).await.0, 200);
        assert_error(&server.get(rule, Some(&alice.token)).await, 404, "M_NOT_FOUND");
        let master = "/_matrix/client/v3/pushrules/global/override/.m.rule.master";
        assert_error(&server.request("DELETE", master, Some(&alice.token), None).await, 403, "M_FORBIDDEN");
        let raw_rules = format!("/_matrix/client/v3/user/{}/account_data/m.push_rules", enc(&alice.user_id));
        assert_error(&server.request("PUT", &raw_rules, Some(&alice.token), Some(json!({}))).await, 400, "M_BAD_JSON");
        // Muting ordinary messages changes what counts as unread.
        for rule in [".m.rule.message", ".m.rule.room_one_to_one"] {
            let path = format!("/_matrix/client/v3/pushrules/global/underride/{rule}/enabled");
            assert_eq!(server.request("PUT", &path, Some(&alice.token), Some(json!({"enabled": false}))).await.0, 200);
        }
        let before = sync(&server, &alice, None).await["next_batch"].as_str().unwrap().to_owned();
        server.request("PUT", &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/q1", enc(&room)), Some(&bob.token),
            Some(json!({"msgtype": "m.text", "body": "quiet"}))).await;
        let after = sync(&server, &alice, Some(&before)).await;
        assert_eq!(after["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 0, "{after}");

        // Presence.
        let presence = format!("/_matrix/client/v3/presence/{}/status", enc(&alice.user_id));
        assert_eq!(server.get(&presence, Some(&bob.token)).await.1["presence"], "online", "syncing marks a user online");
        let quiet = server.register("quiet", PW).await;
        let never = format!("/_matrix/client/v3/presence/{}/status", enc(&quiet.user_id));
        assert_eq!(server.get(&never, Some(&bob.token)).await.1["presence"], "offline", "never seen: offline");
        let bob_since = sync(&server, &bob, None).await["next_batch"].as_str().unwrap().to_owned();
        assert_eq!(server.request("PUT", &presence, Some(&alice.token), Some(json!({"presence": "online", "status_msg": "here"}))).await.0, 200);
        let update = sync(&server, &bob, Some(&bob_since)).await;
        let seen_in_sync = update["presence"]["events"].as_array().unwrap().iter()
            .any(|e| e["sender"] == alice.user_id.as_str() && e["content"]["status_msg"] == "here");
        assert!(seen_in_sync, "bob's sync carries alice's presence: {update}");
        let (_, seen) = server.get(&presence, Some(&bob.token)).await;
        assert_eq!((seen["presence"].as_str(), seen["status_msg"].as_str()), (Some("online"), Some("here")));
        assert_error(&server.request("PUT", &presence, Some(&bob.token), Some(json!({"presence": "online"}))).await, 403, "M_FORBIDDEN");
        server.stop().await;
    }

    async fn context_and_pushers(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", PW).await;
        let bob = server.register("bob", PW).await;
        let room = shared_room(&server, &alice, &bob).await;
        let mut ids = Vec::new();
        for n in 0..5 {
            let (_, sent) = server.request("PUT", &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/c{n}", enc(&room)),
                Some(&alice.token), Some(json!({"msgtype": "m.text", "body": format!("m{n}")}))).await;
            ids.push(sent["event_id"].as_str().unwrap().to_owned());
        }
        let path = format!("/_matrix/client/v3/rooms/{}/context/{}?limit=4", enc(&room), enc(&ids[2]));
        let (status, context) = server.get(&path, Some(&bob.token)).await;
        assert_eq!(status, 200, "{context}");
        assert_eq!(context["event"]["content"]["body"], "m2");
        let bodies = |list: &Value| list.as_array().unwrap().iter().map(|e| e["content"]["body"].as_str().unwrap_or("").to_owned()).collect::<Vec<_>>();
        assert_eq!(bodies(&context["events_before"]), ["m1", "m0"]);
        assert_eq!(bodies(&context["events_after"]), ["m3", "m4"]);
        assert!(context["state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"));
        let carol = server.register("carol", PW).await;
        assert_error(&server.get(&path, Some(&carol.token)).await, 403, "M_FORBIDDEN");

        let pusher = json!({"kind": "http", "app_id": "org.example.app", "pushkey": "key1", "app_display_name": "App",
            "device_display_name": "Phone", "lang": "en", "data": {"url": "https://push.example.org/_matrix/push/v1/notify"}});
        let (status, body) = server.post("/_matrix/client/v3/pushers/set", Some(&alice.token), pusher.clone()).await;
        assert_eq!(status, 200, "{body}");
        let (_, listed) = server.get("/_matrix/client/v3/pushers", Some(&alice.token)).await;
        assert_eq!(listed["pushers"][0]["pushkey"], "key1");
        assert_eq!(listed["pushers"][0]["data"]["url"], "https://push.example.org/_matrix/push/v1/notify");
        // The same key registered by Bob replaces Alice's (append defaults to false).
        assert_eq!(server.post("/_matrix/client/v3/pushers/set", Some(&bob.token), pusher).await.0, 200);
        assert_eq!(server.get("/_matrix/client/v3/pushers", Some(&alice.token)).await.1["pushers"], json!([]));
        let delete = json!({"kind": null, "app_id": "org.example.app", "pushkey": "key1"});
        assert_eq!(server.post("/_matrix/client/v3/pushers/set", Some(&bob.token), delete).await.0, 200);
        assert_eq!(server.get("/_matrix/client/v3/pushers", Some(&bob.token)).await.1["pushers"], json!([]));
        server.stop().await;
    }
}
