//! A site whose store is lent to its commands while it serves (`Node::hosting`): the
//! commands' checks and commits hold while the site's own engine commits at full speed
//! between their reads — nothing is taken for damage, nothing is lost.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step stops the test, with what broke"
)]

use keyfab_site::provision::{ProvisionRequest, Provisioner};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[test]
fn a_commands_checks_and_commits_hold_while_the_engine_commits() {
    let kit = keyfab_testkit::World::new();
    let id = kit.entitlement(
        "busy",
        &keyfab_testkit::policy(1_000_000, "", "derived"),
        &[],
    );
    let keyfab_testkit::World {
        site, dir: _dir, ..
    } = kit;
    let node = Arc::new(Arc::try_unwrap(site).ok().expect("one owner").hosting());
    let engine = Arc::new(Provisioner::start(node.clone()));
    let stop = AtomicBool::new(false);
    let released = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let (engine, id, stop) = (engine.clone(), id.clone(), &stop);
                scope.spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let device = format!("D-{t}-{n:06}");
                        let req =
                            ProvisionRequest::parse(&id, &device, format!("q-{t}-{n}")).unwrap();
                        engine.provision(req).unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        // What `site provision` checks first, and a setting committed with its audit
        // record, again and again while the engine moves the log's head.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut i = 0;
        while std::time::Instant::now() < until {
            keyfab_site::latch::check_cheaply(&node).unwrap();
            if i % 100 == 0 {
                keyfab_site::settings::CLOCK_TOLERANCE
                    .set(&node, 300 + i % 1000)
                    .unwrap();
            }
            i += 1;
        }
        stop.store(true, Ordering::Relaxed);
        workers.into_iter().map(|w| w.join().unwrap()).sum::<u64>()
    });
    assert!(released > 0);
    // The whole log, as `site serve` checks it at start: every record chained, the
    // counters what the records say.
    keyfab_site::latch::check_on_start(&node).unwrap();
    assert_eq!(
        keyfab_site::provision::counters(&node, &id).unwrap().total,
        released
    );
}
