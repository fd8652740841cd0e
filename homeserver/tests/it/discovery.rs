//! Server discovery through DNS: servers named without a port and without a well-known
//! delegation are found through their SRV records, served by a DNS server of the test's
//! (`federation.nameservers`).

use std::net::Ipv4Addr;

use serde_json::json;

use crate::{
    common::{Db, enc},
    dns::TestDns,
    federation::{Federating, StandIn},
    interop::free_port,
    tls::TestCa,
};

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
}
