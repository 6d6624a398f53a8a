//! The store conformance suite, run against every backend: the embedded redb
//! store and a real etcd started by the test.

#![allow(async_fn_in_trait, reason = "a test-only trait")]
#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

mod coordination;
mod suite;

use atoll_store::{Coordination, EmbeddedStore, EtcdOptions, EtcdStore, Store};
use atoll_testing::EtcdServer;

/// Opens a store of one backend, and reopens it (same data) on demand.
pub(crate) trait Backend {
    type Store: Store + Coordination + Clone;
    async fn open(&self) -> Self::Store;
}

#[derive(Debug)]
pub(crate) struct Embedded {
    dir: tempfile::TempDir,
}

impl Embedded {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
}

impl Backend for Embedded {
    type Store = EmbeddedStore;
    async fn open(&self) -> EmbeddedStore {
        EmbeddedStore::open(self.dir.path()).expect("open embedded store")
    }
}

#[derive(Debug)]
pub(crate) struct Etcd {
    server: EtcdServer,
}

impl Etcd {
    fn new() -> Self {
        Self {
            server: EtcdServer::start(),
        }
    }
}

impl Backend for Etcd {
    type Store = EtcdStore;
    async fn open(&self) -> EtcdStore {
        EtcdStore::connect(EtcdOptions::new(vec![self.server.endpoint().to_owned()]))
            .await
            .expect("connect to etcd")
    }
}

macro_rules! conformance {
    ($($module:ident :: $case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$module::$case(&super::Embedded::new()).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$module::$case(&super::Etcd::new()).await;
                }
            )*
        }
    };
}

conformance!(
    suite::an_empty_store,
    suite::creates_and_reads_back,
    suite::resource_versions_guard_writes,
    suite::concurrent_conflicting_writes_have_one_winner,
    suite::concurrent_blind_writes_are_serialized,
    suite::a_failing_batch_changes_nothing,
    suite::a_stale_base_revision_is_refused,
    suite::history_and_rollback,
    suite::the_audit_log_pages,
    suite::watch_replays_then_follows,
    suite::state_survives_reopening,
    suite::malformed_commits_are_refused,
    suite::workspaces_keep_the_same_name_apart,
    coordination::keys_compare_and_swap,
    coordination::a_prefix_watch_sees_changes_in_order,
    coordination::a_lease_keeps_its_keys_only_while_kept_alive,
    coordination::one_leader_at_a_time_and_terms_grow,
    coordination::keys_without_a_lease_survive_reopening,
);
