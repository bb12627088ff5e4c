//! Scaling down in window mode: two instances of one group share the input
//! while it flows; one stops (SIGTERM) and the other takes its partitions
//! over, from their committed offsets and window checkpoints. Lateness is
//! judged per partition and travels with the partition's checkpoint, so the
//! late events are exactly an independent per-partition oracle's, whoever
//! read each partition when.

use std::time::Duration;

use crate::common::broker::Broker;
use crate::common::order::published_count;
use crate::common::service::{logged_env, wait_committed_while_running, Service};
use crate::common::windowed::*;
use crate::common::*;

const READY: Duration = Duration::from_secs(60);
const DONE: Duration = Duration::from_secs(180);

/// Instances `a` and `c` of one group read three partitions while the input
/// is produced at 300 messages a second, its event time running three times
/// as fast as the clock (a window of 1,000 events closes about every three
/// seconds). Once both have committed, `a` gets SIGTERM: it delivers and
/// commits the windows it closed and exits 0, its open windows unpublished;
/// its partitions move to `c`, which goes on with them while the input goes
/// on. Checked: over distinct packet ids every valid event is counted once
/// or is late; the late dead letters are exactly the per-partition oracle's
/// (no on-time event is dead-lettered as late); every packet id carries one
/// content; `a`'s packets name only its partitions and `c`'s include them
/// after the move; every logged commit follows the packets of the windows
/// it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_down_moves_the_partitions_with_their_lateness_in_window_mode() {
    let group = "scale";
    let b = Broker::start();
    b.create_topic(INPUT, 3).await;
    b.create_topic(OUTPUT, 1).await;
    b.create_topic(DLQ, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let e = logged_env(&b.bootstrap, group, &Mode::Window.env());
    let mut a = Service::start(dir.path(), "a", &e);
    a.wait_ready(READY);
    let mut c = Service::start(dir.path(), "c", &e);
    c.wait_ready(READY);
    // Both members hold partitions now; the rebalance that let the second in is over.
    a.wait_ready(READY);

    let all = timed_input(81, 5_000, 60_000, 3, 10.0);
    let feed = Feed::start(&b.bootstrap, INPUT, all.inputs.clone(), 300.0);
    // A few windows of each instance delivered and committed first.
    let deadline = std::time::Instant::now() + DONE;
    while committed(&b.bootstrap, group, 3).iter().any(|o| *o < 1_000)
        || published_count(&a.stderr()) < 3
        || published_count(&c.stderr()) < 3
    {
        a.assert_running();
        c.assert_running();
        assert!(
            std::time::Instant::now() < deadline,
            "both instances publish and commit: committed {:?}",
            committed(&b.bootstrap, group, 3)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let moved = assigned(&a.stderr());
    assert!(
        !moved.is_empty() && moved.len() < 3,
        "a holds some of the partitions: {moved:?}"
    );
    a.signal("TERM");
    assert_eq!(a.wait_exit(DONE), Some(0), "{}", a.stderr());
    let at_stop = committed(&b.bootstrap, group, 3);
    // c goes on with a's partitions for a few windows more.
    c.wait_for("c reads and commits a's partitions", DONE, |s| {
        assigned(&s.stderr()).len() == 3 && {
            let now = committed(&b.bootstrap, group, 3);
            moved
                .iter()
                .all(|p| now[*p as usize] >= at_stop[*p as usize] + 1_000)
        }
    });
    let n = feed.stop();
    let input = all.prefix(n);
    let ends = end_offsets(&input.map(), 3);
    wait_committed_while_running(&b.bootstrap, group, &ends, DONE, &mut [&mut c]);
    c.signal("TERM");
    assert_eq!(c.wait_exit(DONE), Some(0), "{}", c.stderr());

    let checked = check_windows(
        group,
        &b.bootstrap,
        OUTPUT,
        DLQ,
        &input,
        &Expect {
            oracle_late: true,
            ..Expect::default()
        },
    );
    assert_closed_by_watermark_and_wait(group, &checked);
    let (pa, pc) = (a.logged_packets(), c.logged_packets());
    let own: std::collections::BTreeSet<i32> = moved.iter().copied().collect();
    assert!(
        partitions_of(&pa).is_subset(&own),
        "a's packets name only its partitions {own:?}: {:?}",
        partitions_of(&pa)
    );
    assert!(
        own.is_subset(&partitions_of(&pc)),
        "c's packets include the partitions it took over {own:?}: {:?}",
        partitions_of(&pc)
    );
    let mut order = WindowCommitOrder::new(&input, &checked.late);
    let (_, commits) = order.check("a", &a.stderr(), &[0, 0, 0]);
    assert!(commits > 0, "a committed");
    let (done, _) = order.check("c", &c.stderr(), &[0, 0, 0]);
    assert_eq!(done, ends, "the logged commits reach the end");
    eprintln!(
        "{group}: {n} messages; a held {moved:?}, committed {at_stop:?} when it stopped; {} packets from a, {} from c",
        pa.len(),
        pc.len()
    );
}
