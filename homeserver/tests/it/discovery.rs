//! Servers with host names (under `hearth.test`), which a DNS server of the test's leads to
//! (`federation.nameservers`): discovery through SRV records, and what needs servers told apart
//! by name (a server ACL, which ignores ports, cannot tell two `127.0.0.1:PORT` servers apart).

use std::net::Ipv4Addr;

use serde_json::json;

use crate::{
    common::{Db, create_room, enc, send_text},
    dns::TestDns,
    federation::{Federating, StandIn, join_by_hand},
    interop::free_port,
    tls::TestCa,
};

/// A stand-in named `name` (under `hearth.test`) that `dns` leads to.
async fn stand_in_named(ca: &TestCa, dns: &TestDns, name: &str) -> StandIn {
    let stand_in = StandIn::start_named(ca, Some(name)).await;
    let target = format!("target-{name}");
    dns.srv(&format!("_matrix-fed._tcp.{name}"), 10, &target, stand_in.port);
    dns.a(&target, Ipv4Addr::LOCALHOST);
    stand_in
}

/// Waits until `stand_in` was sent a message with `body`.
async fn wait_for(stand_in: &StandIn, body: &str) {
    let started = std::time::Instant::now();
    while !stand_in.bodies().iter().any(|got| got == body) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "{body} not sent: {:?}",
            stand_in.bodies()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

crate::on_both_backends! {
    /// A server named `fed.hearth.test` (no address of its own in DNS, so no well-known answer)
    /// is reached at the target and port of its `_matrix-fed._tcp` record, preferred to its
    /// `_matrix._tcp` one, whose port leads nowhere; one with only a `_matrix._tcp` record is
    /// reached through that, with the server's name as the Host header. Profiles are fetched
    /// from both through another Hearth's client API.
    async fn servers_named_without_a_port_are_found_through_their_srv_records(db: Db) {
        let ca = TestCa::new();
        let dns = TestDns::start().await;
        let a = Federating::start_named(db, &ca, Some("fed.hearth.test"), |_| {}).await;
        let a_port = a.server.server.federation_addr().unwrap().port();
        dns.srv("_matrix-fed._tcp.fed.hearth.test", 10, "target-a.hearth.test", a_port);
        dns.srv("_matrix._tcp.fed.hearth.test", 10, "target-a.hearth.test", free_port());
        dns.a("target-a.hearth.test", Ipv4Addr::LOCALHOST);
        let legacy = StandIn::start_named(&ca, Some("legacy.hearth.test")).await;
        let legacy_port = legacy.port;
        dns.srv("_matrix._tcp.legacy.hearth.test", 10, "target-legacy.hearth.test", legacy_port);
        dns.a("target-legacy.hearth.test", Ipv4Addr::LOCALHOST);
        legacy.answer("/_matrix/federation/v1/query/profile", json!({"displayname": "Dora"}));

        let b = Federating::start_with(Db::Sqlite, &ca, |config| {
            config.federation.nameservers = vec![dns.addr.to_string()];
        })
        .await;
        let alice = a.server.register("alice", "a long password").await;
        let path = format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice.user_id));
        crate::common::put_ok(&a.server, &alice, &path, json!({"displayname": "Alice of fed"})).await;
        assert_eq!(alice.user_id, "@alice:fed.hearth.test");
        let bob = b.server.register("bob", "a long password").await;

        let (status, profile) = b.server.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice.user_id)), Some(&bob.token)).await;
        assert_eq!((status, &profile["displayname"]), (200, &json!("Alice of fed")), "{profile}");
        let dora = "@dora:legacy.hearth.test";
        let (status, profile) = b.server.get(&format!("/_matrix/client/v3/profile/{}", enc(dora)), Some(&bob.token)).await;
        assert_eq!((status, &profile["displayname"]), (200, &json!("Dora")), "{profile}");
        assert_eq!(legacy.hosts(), ["legacy.hearth.test"], "{:?}", legacy.asked());
        legacy.handle.stop(false).await;
        a.stop().await;
        b.stop().await;
    }

    /// A server the room's ACL denies is not sent the room's events: of two servers in the room,
    /// the one denied stops getting them (the ACL event included), the other goes on.
    async fn a_server_the_acl_denies_is_not_sent_the_rooms_events(db: Db) {
        let ca = TestCa::new();
        let dns = TestDns::start().await;
        let (one, two) = (stand_in_named(&ca, &dns, "one.hearth.test").await, stand_in_named(&ca, &dns, "two.hearth.test").await);
        let a = Federating::start_with(db, &ca, |config| config.federation.nameservers = vec![dns.addr.to_string()]).await;
        let alice = a.server.register("alice", "a long password").await;
        let room = create_room(&a.server, &alice, json!({"preset": "public_chat", "room_version": "12"})).await;
        join_by_hand(&ca, one.signer(), &a, &room, "@u:one.hearth.test").await;
        join_by_hand(&ca, two.signer(), &a, &room, "@u:two.hearth.test").await;
        send_text(&a.server, &alice, &room, "t1", "before the ACL").await;
        wait_for(&one, "before the ACL").await;
        wait_for(&two, "before the ACL").await;

        let acl = json!({"allow": ["*"], "deny": ["two.hearth.test"], "allow_ip_literals": true});
        crate::common::put_state(&a.server, &alice, &room, "m.room.server_acl", "", acl).await;
        send_text(&a.server, &alice, &room, "t2", "after the ACL").await;
        wait_for(&one, "after the ACL").await;
        // Sent to both at once before: a moment more is plenty for the denied one to get it.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(two.bodies(), ["before the ACL"]);
        assert!(!two.received_types().iter().any(|kind| kind == "m.room.server_acl"), "{:?}", two.received_types());
        assert!(one.received_types().iter().any(|kind| kind == "m.room.server_acl"), "{:?}", one.received_types());
        for stand_in in [one, two] {
            stand_in.handle.stop(false).await;
        }
        a.stop().await;
    }
}
