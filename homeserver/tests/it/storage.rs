//! The storage conformance suite: every trait, against both backends.

use homeserver::storage::{
    AccountStore, DeviceStore, MAX_OPENID_TOKENS_PER_USER, NewNotification, OpenIdStore, PushStore,
    PusherKey, RegistrationTokenStore, ReportRecord, ReportStore, SessionRecord, SessionStore, SqlStore,
    UiaSessionRecord, UiaStore, UserDataStore, now_ms,
};
use ruma::{OwnedDeviceId, OwnedUserId};

use crate::common::{Db, TestDb};

async fn store(db: Db) -> (SqlStore, TestDb) {
    let test_db = TestDb::new(db).await;
    let store = SqlStore::connect(&test_db.url, 4).await.expect("connect");
    store.migrate().await.expect("migrate");
    store.migrate().await.expect("migrating twice is a no-op");
    (store, test_db)
}

fn user(name: &str) -> OwnedUserId {
    format!("@{name}:localhost").try_into().expect("user id")
}

fn device(id: &str) -> OwnedDeviceId {
    id.into()
}

crate::on_both_backends! {
    async fn push_leases_and_pusher_claims_are_exclusive(db: Db) {
        let (store, test_db) = store(db).await;
        // The evaluator's lease: one holder; only the holder commits; the position never goes back.
        let start = store.claim_push_progress("a", 60_000).await.unwrap().expect("a takes the free lease");
        assert_eq!(store.claim_push_progress("b", 60_000).await.unwrap(), None, "b waits while a holds it");
        let found = |at: i64| NewNotification {
            user_id: "@alice:localhost".into(), stream_ordering: at, room_id: "!r:localhost".into(),
            event_id: format!("$e{at}"), event_type: "m.room.message".into(), actions: r#"["notify"]"#.into(),
            highlight: false, ts: now_ms(),
        };
        assert!(!store.record_notifications("b", 60_000, start + 5, &[found(start + 5)]).await.unwrap(), "b cannot commit");
        assert!(store.record_notifications("a", 60_000, start + 5, &[found(start + 5)]).await.unwrap());
        assert!(store.record_notifications("a", 60_000, start + 5, &[found(start + 5)]).await.unwrap(), "a repeat is harmless");
        assert!(!store.record_notifications("a", 60_000, start + 4, &[]).await.unwrap(), "the position never goes back");
        // A lapsed lease goes to the next worker, at the stored position; the old holder is fenced.
        assert_eq!(store.claim_push_progress("a", 1).await.unwrap(), Some(start + 5));
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        assert_eq!(store.claim_push_progress("b", 60_000).await.unwrap(), Some(start + 5));
        assert!(!store.record_notifications("a", 60_000, start + 6, &[found(start + 6)]).await.unwrap(), "a lost it");
        store.release_push_progress("b").await.unwrap();
        assert_eq!(store.claim_push_progress("a", 60_000).await.unwrap(), Some(start + 5), "released at once");

        // Pushers: a new one starts at the evaluator's position, so it has nothing to send yet.
        let key = PusherKey { user_id: "@alice:localhost".into(), app_id: "app".into(), pushkey: "k".into() };
        store.put_pusher(&key, "http", "{}", true, Some("DEV")).await.unwrap();
        assert!(store.claim_pushers("w1", 60_000, 10).await.unwrap().is_empty());
        assert!(store.record_notifications("a", 60_000, start + 10, &[found(start + 10)]).await.unwrap());
        let claimed = store.claim_pushers("w1", 60_000, 10).await.unwrap();
        assert_eq!(claimed.iter().map(|p| (p.key.clone(), p.position)).collect::<Vec<_>>(), [(key.clone(), start + 5)]);
        assert!(store.claim_pushers("w2", 60_000, 10).await.unwrap().is_empty(), "one worker at a time");
        assert!(!store.pusher_advanced(&key, "w2", start + 10).await.unwrap(), "only the claimant moves it");
        assert!(store.renew_pusher(&key, "w1", 60_000).await.unwrap() && !store.renew_pusher(&key, "w2", 60_000).await.unwrap());
        // A failure releases it, due again only after its wait.
        store.pusher_backoff(&key, "w1", 1, 60_000).await.unwrap();
        assert!(store.claim_pushers("w2", 60_000, 10).await.unwrap().is_empty(), "not before its retry is due");
        assert!(!store.renew_pusher(&key, "w1", 60_000).await.unwrap(), "released");
        store.put_pusher(&key, "http", "{}", true, Some("DEV")).await.unwrap();
        let claimed = store.claim_pushers("w2", 60_000, 10).await.unwrap();
        assert_eq!((claimed.len(), claimed[0].failures), (1, 0), "set again, it starts afresh on retries");
        assert!(store.pusher_advanced(&key, "w2", start + 10).await.unwrap());
        assert!(!store.pusher_advanced(&key, "w2", start + 10).await.unwrap(), "it never goes back or repeats");
        store.release_pushers("w2").await.unwrap();
        assert!(store.claim_pushers("w1", 60_000, 10).await.unwrap().is_empty(), "nothing left to send");
        // A read receipt's badge update is something to send.
        store.mark_badge(&user("alice")).await.unwrap();
        let claimed = store.claim_pushers("w1", 60_000, 10).await.unwrap();
        assert!(claimed.len() == 1 && claimed[0].badge);
        assert!(store.take_badge(&key, "w1").await.unwrap() && !store.take_badge(&key, "w1").await.unwrap());
        assert!(store.delete_pusher(&key).await.unwrap() && !store.delete_pusher(&key).await.unwrap());
        store.close().await;
        test_db.remove().await;
    }

    async fn accounts(db: Db) {
        let (store, test_db) = store(db).await;
        let alice = user("alice");
        assert!(store.create_user(&alice, Some("hash1"), false).await.unwrap());
        assert!(!store.create_user(&alice, Some("other"), true).await.unwrap(), "ids are unique");
        let record = store.get_user(&alice).await.unwrap().unwrap();
        assert_eq!(record.password_hash.as_deref(), Some("hash1"));
        assert!(!record.is_admin && !record.deactivated);
        assert!(record.created_ts > 0);
        store.set_password_hash(&alice, Some("hash2")).await.unwrap();
        assert_eq!(store.get_user(&alice).await.unwrap().unwrap().password_hash.as_deref(), Some("hash2"));
        assert!(store.get_user(&user("nobody")).await.unwrap().is_none());

        let session = SessionRecord { session_id: "s1".into(), user_id: alice.clone(), device_id: device("D1"), generation: 0 };
        store.login_device(&session, None, Some("phone"), Some("127.0.0.1"), 101).await.unwrap();
        assert_eq!(store.list_devices(&alice).await.unwrap().len(), 1);
        store.deactivate_user(&alice, 112).await.unwrap();
        let record = store.get_user(&alice).await.unwrap().unwrap();
        assert!(record.deactivated);
        assert_eq!(record.password_hash, None);
        assert!(store.list_devices(&alice).await.unwrap().is_empty());
        assert!(store.get_session("s1").await.unwrap().is_none());
        assert!(!store.create_user(&alice, None, false).await.unwrap(), "deactivated ids are never reused");
        store.close().await;
        test_db.remove().await;
    }

    async fn devices(db: Db) {
        let (store, test_db) = store(db).await;
        let alice = user("alice");
        store.upsert_device(&alice, &device("D1"), Some("phone"), Some("10.0.0.1")).await.unwrap();
        store.upsert_device(&alice, &device("D2"), None, None).await.unwrap();
        // Re-login on D1 without a name keeps the name.
        store.upsert_device(&alice, &device("D1"), None, Some("10.0.0.2")).await.unwrap();
        let d1 = store.get_device(&alice, &device("D1")).await.unwrap().unwrap();
        assert_eq!(d1.display_name.as_deref(), Some("phone"));
        assert_eq!(d1.last_seen_ip.as_deref(), Some("10.0.0.2"));
        assert!(d1.last_seen_ts.is_some());
        let all = store.list_devices(&alice).await.unwrap();
        assert_eq!(all.iter().map(|d| d.device_id.as_str()).collect::<Vec<_>>(), ["D1", "D2"]);
        assert!(store.list_devices(&user("bob")).await.unwrap().is_empty());

        assert!(store.set_device_display_name(&alice, &device("D2"), Some("laptop")).await.unwrap());
        assert!(!store.set_device_display_name(&alice, &device("NOPE"), Some("x")).await.unwrap());
        assert!(!store.set_device_display_name(&user("bob"), &device("D2"), Some("x")).await.unwrap(), "devices belong to their user");
        store.touch_device(&alice, &device("D2"), "192.0.2.1").await.unwrap();
        assert_eq!(store.get_device(&alice, &device("D2")).await.unwrap().unwrap().last_seen_ip.as_deref(), Some("192.0.2.1"));

        for (sid, dev) in [("s1", "D1"), ("s2", "D2")] {
            let session = SessionRecord { session_id: sid.into(), user_id: alice.clone(), device_id: device(dev), generation: 0 };
            store.login_device(&session, None, None, None, 102).await.unwrap();
        }
        store.delete_devices(&alice, &[device("D2"), device("UNKNOWN")], 111).await.unwrap();
        assert!(store.get_device(&alice, &device("D2")).await.unwrap().is_none());
        assert!(store.get_session("s2").await.unwrap().is_none(), "a deleted device's sessions go with it");
        assert!(store.get_session("s1").await.unwrap().is_some());

        store.upsert_device(&alice, &device("D3"), None, None).await.unwrap();
        store.delete_devices_except(&alice, Some(&device("D3")), 109).await.unwrap();
        assert_eq!(store.list_devices(&alice).await.unwrap().len(), 1);
        assert!(store.get_session("s1").await.unwrap().is_none());
        store.delete_devices_except(&alice, None, 110).await.unwrap();
        assert!(store.list_devices(&alice).await.unwrap().is_empty());
        store.close().await;
        test_db.remove().await;
    }

    async fn sessions(db: Db) {
        let (store, test_db) = store(db).await;
        let alice = user("alice");
        let session = SessionRecord { session_id: "s1".into(), user_id: alice.clone(), device_id: device("D1"), generation: 0 };
        store.login_device(&session, Some("r1"), Some("tablet"), Some("10.0.0.1"), 103).await.unwrap();
        assert_eq!(store.get_session("s1").await.unwrap().unwrap(), session);
        let d1 = store.get_device(&alice, &device("D1")).await.unwrap().unwrap();
        assert_eq!((d1.display_name.as_deref(), d1.last_seen_ip.as_deref()), (Some("tablet"), Some("10.0.0.1")));

        let refreshed = store.refresh_session("r1", "r2", 105).await.unwrap().unwrap();
        assert_eq!(refreshed.generation, 1);
        assert_eq!(refreshed.session_id, "s1");
        assert!(store.refresh_session("r1", "r3", 106).await.unwrap().is_none(), "a refresh token works once");
        assert_eq!(store.refresh_session("r2", "r3", 107).await.unwrap().unwrap().generation, 2);

        // Logging in again on the same device replaces its session and keeps its name.
        let again = SessionRecord { session_id: "s2".into(), ..session };
        store.login_device(&again, None, None, Some("10.0.0.2"), 104).await.unwrap();
        assert!(store.get_session("s1").await.unwrap().is_none(), "the device's old session is revoked");
        assert!(store.refresh_session("r3", "r4", 108).await.unwrap().is_none(), "and so is its refresh token");
        assert_eq!(store.get_session("s2").await.unwrap().unwrap(), again);
        let d1 = store.get_device(&alice, &device("D1")).await.unwrap().unwrap();
        assert_eq!((d1.display_name.as_deref(), d1.last_seen_ip.as_deref()), (Some("tablet"), Some("10.0.0.2")));
        assert_eq!(store.list_devices(&alice).await.unwrap().len(), 1);
        store.close().await;
        test_db.remove().await;
    }

    async fn uia_sessions(db: Db) {
        let (store, test_db) = store(db).await;
        let record = UiaSessionRecord {
            session_id: "u1".into(),
            operation: "delete_devices:x".into(),
            user_id: Some(user("alice")),
            completed: vec![],
            threepid_sids: vec![],
            created_ts: now_ms(),
            params: Some(r#"{"device_id":"D"}"#.into()),
            result: None,
        };
        store.create_uia_session(&record).await.unwrap();
        assert_eq!(store.get_uia_session("u1").await.unwrap().unwrap(), record);
        store.set_uia_params("u1", "{}").await.unwrap();
        store.set_uia_result("u1", "@alice:localhost").await.unwrap();
        let stored = store.get_uia_session("u1").await.unwrap().unwrap();
        assert_eq!((stored.params.as_deref(), stored.result.as_deref()), (Some("{}"), Some("@alice:localhost")));
        store.set_uia_completed("u1", &["m.login.email.identity".to_owned()], &["sid1".to_owned()]).await.unwrap();
        let stored = store.get_uia_session("u1").await.unwrap().unwrap();
        assert_eq!(stored.completed, ["m.login.email.identity"]);
        assert_eq!(stored.threepid_sids, ["sid1"]);
        let old = UiaSessionRecord { session_id: "u0".into(), user_id: None, created_ts: 1, ..record };
        store.create_uia_session(&old).await.unwrap();
        assert_eq!(store.delete_uia_sessions_before(now_ms() - 60_000).await.unwrap(), 1);
        assert!(store.get_uia_session("u0").await.unwrap().is_none());
        store.delete_uia_session("u1").await.unwrap();
        assert!(store.get_uia_session("u1").await.unwrap().is_none());
        store.close().await;
        test_db.remove().await;
    }

    async fn registration_tokens(db: Db) {
        let (store, test_db) = store(db).await;
        let now = now_ms();
        store.create_registration_token("twice", Some(2), None).await.unwrap();
        store.create_registration_token("expired", None, Some(now - 1)).await.unwrap();
        store.create_registration_token("forever", None, None).await.unwrap();
        assert!(store.registration_token_valid("twice", now).await.unwrap());
        assert!(store.use_registration_token("twice", now).await.unwrap());
        assert!(store.use_registration_token("twice", now).await.unwrap());
        assert!(!store.use_registration_token("twice", now).await.unwrap(), "uses run out");
        assert!(!store.registration_token_valid("twice", now).await.unwrap());
        assert!(!store.registration_token_valid("expired", now).await.unwrap());
        assert!(!store.use_registration_token("expired", now).await.unwrap());
        assert!(!store.registration_token_valid("missing", now).await.unwrap());
        for _ in 0..3 {
            assert!(store.use_registration_token("forever", now).await.unwrap());
        }
        store.close().await;
        test_db.remove().await;
    }

    async fn logins_refreshes_and_logouts_racing_on_one_device_all_commit(db: Db) {
        let (store, test_db) = store(db).await;
        let alice = user("alice");
        let session = {
            let alice = alice.clone();
            move |n: usize| SessionRecord {
                session_id: format!("s{n}"),
                user_id: alice.clone(),
                device_id: device("D1"),
                generation: 0,
            }
        };
        // Two of each at once, a few hundred times: with the locks taken in different orders,
        // Postgres found a deadlock within a few rounds.
        let mut tasks = Vec::new();
        for task in 0..2 {
            let (store, session, alice) = (store.clone(), session.clone(), alice.clone());
            tasks.push(tokio::spawn(async move {
                for n in (task..400).step_by(2) {
                    let hash = format!("r{n}");
                    store.login_device(&session(n), Some(&hash), None, None, 1000 + n as i64).await.unwrap();
                    store.refresh_session(&hash, &format!("x{n}"), 2000 + n as i64).await.unwrap();
                    store.delete_devices(&alice, &[device("D1")], 3000 + n as i64).await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.expect("no transaction fails (on Postgres: no deadlock)");
        }
        store.close().await;
        test_db.remove().await;
    }

    async fn concurrent_registration_token_use_is_atomic(db: Db) {
        let (store, test_db) = store(db).await;
        store.create_registration_token("once", Some(1), None).await.unwrap();
        let now = now_ms();
        let attempts = (0..8).map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.use_registration_token("once", now).await.unwrap() })
        });
        let mut wins = 0;
        for attempt in attempts {
            wins += usize::from(attempt.await.unwrap());
        }
        assert_eq!(wins, 1, "a single-use token is used once, however many race for it");
        store.close().await;
        test_db.remove().await;
    }

    async fn account_data_updates_of_one_user_apply_one_after_the_other(db: Db) {
        let (store, test_db) = store(db).await;
        let alice = user("alice");
        store.create_user(&alice, None, false).await.unwrap();
        // Each update appends its number to a list; racing, none may be lost.
        let updates = (0..8).map(|n| {
            let (store, alice) = (store.clone(), alice.clone());
            tokio::spawn(async move {
                let append = move |current: Option<&str>| {
                    let mut list: Vec<i64> = current.map(|c| serde_json::from_str(c).unwrap()).unwrap_or_default();
                    list.push(n);
                    Ok(Some(serde_json::to_string(&list).unwrap()))
                };
                store.update_account_data(&alice, Some("!room:localhost"), "org.example.list", 100 + n, &append).await.unwrap()
            })
        });
        for update in updates {
            assert_eq!(update.await.unwrap(), Ok(true));
        }
        let stored = store.account_data(&alice, Some("!room:localhost"), "org.example.list").await.unwrap().unwrap();
        let mut list: Vec<i64> = serde_json::from_str(&stored).unwrap();
        list.sort_unstable();
        assert_eq!(list, (0..8).collect::<Vec<_>>());
        // No change, and a refusal, leave it as it is.
        let unchanged = store.update_account_data(&alice, Some("!room:localhost"), "org.example.list", 200, &|_| Ok(None));
        assert_eq!(unchanged.await.unwrap(), Ok(false));
        let refused = store.update_account_data(&alice, Some("!room:localhost"), "org.example.list", 201, &|_| Err("no".to_owned()));
        assert_eq!(refused.await.unwrap(), Err("no".to_owned()));
        assert_eq!(store.account_data(&alice, Some("!room:localhost"), "org.example.list").await.unwrap().unwrap(), stored);
        store.close().await;
        test_db.remove().await;
    }

    async fn erased_accounts_reports_and_openid_tokens(db: Db) {
        let (store, test_db) = store(db).await;
        let (alice, bob) = (user("alice"), user("bob"));
        for who in [&alice, &bob] {
            store.create_user(who, None, false).await.unwrap();
        }
        store.set_displayname(&alice, Some("Alice")).await.unwrap();
        store.set_avatar_url(&alice, Some("mxc://localhost/a")).await.unwrap();
        store.erase_user(&alice).await.unwrap();
        assert_eq!(store.profile(&alice).await.unwrap(), (None, None));
        let erased = store.erased_among(&[alice.as_str(), bob.as_str(), "@nobody:localhost"]).await.unwrap();
        assert_eq!(erased.into_iter().collect::<Vec<_>>(), [alice.to_string()]);
        // More ids than one `IN` list holds.
        let many: Vec<String> = (0..1200).map(|n| format!("@u{n}:localhost")).collect();
        let mut ids: Vec<&str> = many.iter().map(String::as_str).collect();
        ids.push(alice.as_str());
        assert_eq!(store.erased_among(&ids).await.unwrap().len(), 1);

        let report = |id: &str, event: Option<&str>, ts| ReportRecord {
            report_id: id.to_owned(), room_id: "!room:localhost".to_owned(), event_id: event.map(str::to_owned),
            reporter: bob.to_string(), reason: Some("why".to_owned()), score: event.map(|_| -100), received_ts: ts,
        };
        store.add_report(&report("r1", Some("$e"), 1)).await.unwrap();
        store.add_report(&report("r2", None, 2)).await.unwrap();
        assert_eq!(store.reports(10).await.unwrap(), [report("r2", None, 2), report("r1", Some("$e"), 1)]);
        assert_eq!(store.reports(1).await.unwrap().len(), 1);

        let now = now_ms();
        store.add_openid_token("h-live", &bob, now + 60_000, now).await.unwrap();
        store.add_openid_token("h-old", &bob, now - 1, now - 120_000).await.unwrap();
        assert_eq!(store.openid_user("h-live", now).await.unwrap(), Some(bob.clone()));
        assert_eq!(store.openid_user("h-old", now).await.unwrap(), None, "expired");
        assert_eq!(store.openid_user("h-none", now).await.unwrap(), None);
        // A user holds a bounded number; the oldest go first.
        for n in 0..MAX_OPENID_TOKENS_PER_USER {
            store.add_openid_token(&format!("h-{n}"), &bob, now + 120_000 + n, now).await.unwrap();
        }
        assert_eq!(store.openid_user("h-live", now).await.unwrap(), None, "the oldest made room");
        assert_eq!(store.openid_user("h-0", now).await.unwrap(), Some(bob.clone()));
        store.deactivate_user(&bob, 1).await.unwrap();
        assert_eq!(store.openid_user("h-0", now).await.unwrap(), None, "a deactivated account's tokens are dead");
        store.close().await;
        test_db.remove().await;
    }
}
