//! The store contract, run against a real etcd started on loopback for the test.

use keyfab_store_etcd::EtcdStore;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd member in a temporary directory, on free loopback ports; killed on drop.
struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    endpoint: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "m1", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("m1={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd not found: install etcd-server (scripts/test.sh does)");
        let etcd = Etcd {
            child,
            _dir: dir,
            endpoint,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), "probe") {
                if keyfab_store::Store::revision(&s).is_ok() {
                    return etcd;
                }
            }
            assert!(Instant::now() < deadline, "etcd did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_store_contract_holds_on_etcd() {
    let etcd = Etcd::start();
    let store = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), "keyfab-test").unwrap();
    keyfab_store::conformance::run_all(&store);
    // A second namespace on the same cluster sees nothing of the first.
    let mut t = keyfab_store::Txn::default();
    t.put(keyfab_store::Table::Meta, b"site", b"shenzhen-1");
    assert!(keyfab_store::Store::commit(&store, t)
        .unwrap()
        .is_committed());
    let other = EtcdStore::connect(std::slice::from_ref(&etcd.endpoint), "keyfab-other").unwrap();
    assert!(
        keyfab_store::Store::get(&other, keyfab_store::Table::Meta, b"site")
            .unwrap()
            .is_none()
    );
}
