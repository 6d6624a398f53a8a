//! The store conformance suite, run against every backend: the embedded redb
//! store and a real etcd started by the test.

#![allow(async_fn_in_trait, reason = "a test-only trait")]
#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]

mod suite;

use atoll_store::{EmbeddedStore, EtcdOptions, EtcdStore, Store};
use atoll_testing::EtcdServer;

/// Opens a store of one backend, and reopens it (same data) on demand.
pub(crate) trait Backend {
    type Store: Store + Clone;
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
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::suite::$case(&super::Embedded::new()).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::suite::$case(&super::Etcd::new()).await;
                }
            )*
        }
    };
}

conformance!(
    an_empty_store,
    creates_and_reads_back,
    resource_versions_guard_writes,
    concurrent_conflicting_writes_have_one_winner,
    concurrent_blind_writes_are_serialized,
    a_failing_batch_changes_nothing,
    a_stale_base_revision_is_refused,
    history_and_rollback,
    the_audit_log_pages,
    watch_replays_then_follows,
    state_survives_reopening,
    malformed_commits_are_refused,
);
