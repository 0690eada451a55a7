//! The store contract, run against a real etcd started on loopback for the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

use keyfab_harness::etcd::EtcdCluster;
use keyfab_store_etcd::EtcdStore;

#[test]
fn the_store_contract_holds_on_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(1, dir.path()).unwrap();
    let store = EtcdStore::connect(&etcd.endpoints(), "keyfab-test").unwrap();
    keyfab_store::conformance::run_all(&store);
    // A second namespace on the same cluster sees nothing of the first.
    let mut t = keyfab_store::Txn::default();
    t.put(keyfab_store::Table::Meta, b"site", b"shenzhen-1");
    assert!(keyfab_store::Store::commit(&store, t)
        .unwrap()
        .is_committed());
    let other = EtcdStore::connect(&etcd.endpoints(), "keyfab-other").unwrap();
    assert!(
        keyfab_store::Store::get(&other, keyfab_store::Table::Meta, b"site")
            .unwrap()
            .is_none()
    );
}
