//! The store over TLS to etcd members that require client certificates: with the right
//! CA and client certificate the contract holds; without a client certificate, or
//! trusting another CA, nothing is reached.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

use keyfab_harness::etcd::{ClusterTls, EtcdCluster};
use keyfab_store_etcd::{EtcdStore, EtcdTls};

#[test]
fn tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let tls = ClusterTls::generate(&dir.path().join("tls")).unwrap();
    let client = tls.client.clone();
    let cluster = EtcdCluster::start_with(3, &dir.path().join("etcd"), Some(tls)).unwrap();
    assert!(cluster.store_spec().starts_with("etcds://"));
    let endpoints = cluster.endpoints();
    assert!(endpoints.iter().all(|e| e.starts_with("https://")));
    let store = EtcdStore::connect_with(&endpoints, "keyfab-tls", Some(&client)).unwrap();
    keyfab_store::conformance::run_all(&store);
    assert!(cluster.leader().is_some());

    // No client certificate: the members refuse the connection.
    let anonymous = EtcdTls {
        ca_pem: client.ca_pem.clone(),
        client: None,
    };
    let refused = EtcdStore::connect_with(&endpoints, "keyfab-tls", Some(&anonymous))
        .and_then(|s| keyfab_store::Store::revision(&s));
    assert!(refused.is_err(), "reached without a client certificate");
    // Trusting another CA: the members are not believed.
    let other = ClusterTls::generate(&dir.path().join("other")).unwrap();
    let stranger = EtcdTls {
        ca_pem: other.client.ca_pem,
        client: client.client.clone(),
    };
    let refused = EtcdStore::connect_with(&endpoints, "keyfab-tls", Some(&stranger))
        .and_then(|s| keyfab_store::Store::revision(&s));
    assert!(
        refused.is_err(),
        "a member with a certificate of another CA was trusted"
    );
}
