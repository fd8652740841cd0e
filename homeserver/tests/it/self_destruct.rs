//! Self-destructing messages (MSC2228, `rooms.self_destructing_messages`): a message that asks
//! for it is emptied once its time has passed, wherever it is read from.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::common::{Db, Session, TestServer, create_room, enc, join_room, put_ok, put_state};

fn now_ms() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

async fn send(server: &TestServer, who: &Session, room: &str, txn: &str, content: Value) -> String {
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room));
    put_ok(server, who, &path, content).await["event_id"].as_str().unwrap().to_owned()
}

async fn event_content(server: &TestServer, who: &Session, room: &str, event_id: &str) -> Value {
    let path = format!("/_matrix/client/v3/rooms/{}/event/{}", enc(room), enc(event_id));
    let (status, event) = server.get(&path, Some(&who.token)).await;
    assert_eq!(status, 200, "{event}");
    event["content"].clone()
}

/// The content of `event_id` in the room's timeline of a sync since `since`.
async fn synced_content(
    server: &TestServer,
    who: &Session,
    room: &str,
    since: &str,
    event_id: &str,
) -> Value {
    let (status, sync) =
        server.get(&format!("/_matrix/client/v3/sync?since={since}&timeout=0"), Some(&who.token)).await;
    assert_eq!(status, 200, "{sync}");
    let events = sync["rooms"]["join"][room]["timeline"]["events"].as_array().cloned().unwrap_or_default();
    let event =
        events.iter().find(|e| e["event_id"] == event_id).unwrap_or_else(|| panic!("{event_id} in {sync}"));
    event["content"].clone()
}

/// The content of `event_id` as the database holds it.
async fn stored_content(server: &TestServer, event_id: &str) -> Value {
    let event = server.server.state.store.get_event(event_id).await.unwrap().unwrap();
    serde_json::from_str::<Value>(&event.json).unwrap()["content"].clone()
}

crate::on_both_backends! {
    async fn a_message_that_asks_to_self_destruct_is_emptied_once_its_time_has_passed(db: Db) {
        let server = TestServer::start_with(db, |config| config.rooms.self_destructing_messages = true).await;
        let alice = server.register("alice", "a long password").await;
        let bob = server.register("bob", "a long password").await;
        let room = create_room(&server, &alice, json!({"invite": [bob.user_id]})).await;
        assert_eq!(join_room(&server, &bob, &room).await.0, 200);
        let (_, first) = server.get("/_matrix/client/v3/sync?timeout=0", Some(&alice.token)).await;
        let since = first["next_batch"].as_str().unwrap().to_owned();

        let expires = now_ms() + 1_500;
        let doomed = json!({"msgtype": "m.text", "body": "gone soon", "org.matrix.self_destruct_after": expires});
        let doomed_id = send(&server, &alice, &room, "t1", doomed.clone()).await;
        // Only an integer time asks for it.
        let odd = json!({"msgtype": "m.text", "body": "kept", "org.matrix.self_destruct_after": "0"});
        let odd_id = send(&server, &alice, &room, "t2", odd.clone()).await;
        // State events never expire: that would change the room's state.
        let topic = json!({"topic": "kept too", "org.matrix.self_destruct_after": 0});
        let topic_id = put_state(&server, &alice, &room, "m.room.topic", "", topic.clone()).await;

        assert_eq!(event_content(&server, &alice, &room, &doomed_id).await, doomed);
        assert_eq!(synced_content(&server, &alice, &room, &since, &doomed_id).await, doomed);

        // Past its time: pruned in the database within about a second.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while now_ms() <= expires || stored_content(&server, &doomed_id).await != json!({}) {
            assert!(std::time::Instant::now() < deadline, "not pruned: {}", stored_content(&server, &doomed_id).await);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(event_content(&server, &alice, &room, &doomed_id).await, json!({}));
        let (status, page) = server
            .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=10", enc(&room)), Some(&alice.token))
            .await;
        assert_eq!(status, 200, "{page}");
        let served = page["chunk"].as_array().unwrap().iter().find(|e| e["event_id"] == doomed_id).cloned().unwrap();
        assert_eq!(served["content"], json!({}));
        // The sync reads the message from the stream window in memory, as it was first read.
        assert_eq!(synced_content(&server, &alice, &room, &since, &doomed_id).await, json!({}));

        // Bob was notified of it (a message in a room of two): the notification shows it empty.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let notified = loop {
            let (status, list) = server.get("/_matrix/client/v3/notifications", Some(&bob.token)).await;
            assert_eq!(status, 200, "{list}");
            let found = list["notifications"].as_array().unwrap().iter().find(|n| n["event"]["event_id"] == doomed_id).cloned();
            if let Some(found) = found {
                break found;
            }
            assert!(std::time::Instant::now() < deadline, "no notification: {list}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(notified["event"]["content"], json!({}));

        assert_eq!(event_content(&server, &alice, &room, &odd_id).await, odd);
        assert_eq!(stored_content(&server, &topic_id).await, topic);
        server.stop().await;
    }

    async fn messages_do_not_self_destruct_unless_the_server_is_configured_for_it(db: Db) {
        let server = TestServer::start(db).await;
        let alice = server.register("alice", "a long password").await;
        let room = create_room(&server, &alice, json!({})).await;
        let content = json!({"msgtype": "m.text", "body": "stays", "org.matrix.self_destruct_after": now_ms() - 1});
        let event_id = send(&server, &alice, &room, "t1", content.clone()).await;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(event_content(&server, &alice, &room, &event_id).await, content);
        assert_eq!(stored_content(&server, &event_id).await, content);
        server.stop().await;
    }
}
