//! A store decorator that fails or slows down on command, for outage and degraded-read
//! tests. It wraps a real store; with every fault off it is a transparent pass-through.
//!
//! The real binary uses it only when `faults.store_write_fault_file` is set: then
//! [`watch_fault_file`] turns write failures on while that file exists, so a test can cause
//! a store outage in a running `playhead serve` from outside the process.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{RecentTitles, Store, StoreError, StoredRow, WriteHealth};
use crate::config::{check, ConfigError};
use crate::model::{Key, Record, Value};
use crate::telemetry::metrics::{DescriptorEncoder, Encoded};

/// Fault injection for reliability tests of the real binary (tests/reliability.rs). Off
/// unless a path is set; never set it in production.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultsConfig {
    /// While a file exists at this absolute path, every store write fails (flushes and
    /// purges are retried as in a real outage; reads still work). Empty: off.
    pub store_write_fault_file: PathBuf,
}

impl FaultsConfig {
    /// Range checks that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fault_file = &self.store_write_fault_file;
        check(
            "faults.store_write_fault_file",
            fault_file.display(),
            fault_file.as_os_str().is_empty() || fault_file.is_absolute(),
            "empty (off) or an absolute path",
        )?;
        Ok(())
    }
}

/// The knobs of a [`FaultyStore`], shared between the store and the test that drives it.
#[derive(Debug, Default)]
pub struct FaultSwitch {
    fail_writes: AtomicBool,
    fail_reads: AtomicBool,
    read_delay_ms: AtomicU64,
    write_attempts: AtomicU64,
    failed_writes: AtomicU64,
    rows_written: AtomicU64,
    /// Syncs still to refuse, besides those refused while writes fail.
    syncs_to_fail: AtomicU64,
    /// Writes still to panic in (a bug in a store, as the flusher sees it).
    writes_to_panic: AtomicU64,
    sync_attempts: AtomicU64,
    rows_written_before_last_sync: AtomicU64,
}

impl FaultSwitch {
    /// Makes every write (or read) fail with [`StoreError::Unavailable`], or stop failing.
    pub fn set_failing(&self, writes: bool, reads: bool) {
        self.fail_writes.store(writes, Ordering::SeqCst);
        self.fail_reads.store(reads, Ordering::SeqCst);
    }

    /// Delays every read by `ms` before answering (0 = no delay).
    pub fn set_read_delay_ms(&self, ms: u64) {
        self.read_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Makes the next `n` syncs fail with [`StoreError::Unavailable`].
    pub fn fail_next_syncs(&self, n: u64) {
        self.syncs_to_fail.store(n, Ordering::SeqCst);
    }

    /// Makes the next `n` writes panic.
    pub fn panic_next_writes(&self, n: u64) {
        self.writes_to_panic.store(n, Ordering::SeqCst);
    }

    /// Syncs attempted, including failed ones.
    pub fn sync_attempts(&self) -> u64 {
        self.sync_attempts.load(Ordering::SeqCst)
    }

    /// [`FaultSwitch::rows_written`] as it stood when the latest sync was attempted.
    pub fn rows_written_before_last_sync(&self) -> u64 {
        self.rows_written_before_last_sync.load(Ordering::SeqCst)
    }

    /// Write batches attempted, including failed ones.
    pub fn write_attempts(&self) -> u64 {
        self.write_attempts.load(Ordering::SeqCst)
    }

    /// Write batches refused by an injected failure.
    pub fn failed_writes(&self) -> u64 {
        self.failed_writes.load(Ordering::SeqCst)
    }

    /// Rows passed to the inner store by successful batches.
    pub fn rows_written(&self) -> u64 {
        self.rows_written.load(Ordering::SeqCst)
    }

    async fn before_read(&self) -> Result<(), StoreError> {
        let delay_ms = self.read_delay_ms.load(Ordering::SeqCst);
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected read failure".into()));
        }
        Ok(())
    }
}

/// Wraps `S`, consulting a shared [`FaultSwitch`] before every call.
pub struct FaultyStore<S> {
    inner: S,
    switch: Arc<FaultSwitch>,
    /// Every write and sync outcome, injected failures included, so `/readyz` and
    /// `/metrics` report an injected outage as they would a real one.
    health: WriteHealth,
}

impl<S: Store> FaultyStore<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            switch: Arc::new(FaultSwitch::default()),
            health: WriteHealth::default(),
        }
    }

    /// The switch that controls this store's faults.
    pub fn switch(&self) -> Arc<FaultSwitch> {
        Arc::clone(&self.switch)
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }
}

#[async_trait]
impl<S: Store> Store for FaultyStore<S> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn write_batch(&self, records: &[Record]) -> Result<(), StoreError> {
        let rows: Vec<StoredRow> = records.iter().copied().map(StoredRow::plain).collect();
        self.write_rows(&rows).await
    }

    async fn write_rows(&self, rows: &[StoredRow]) -> Result<(), StoreError> {
        let written = self.write_batch_with_faults(rows).await;
        self.health.record_write(&written);
        written
    }

    async fn get_row(&self, key: Key) -> Result<Option<StoredRow>, StoreError> {
        self.switch.before_read().await?;
        self.inner.get_row(key).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        let synced = self.sync_with_faults().await;
        self.health.record_sync(&synced);
        synced
    }

    async fn get(&self, key: Key) -> Result<Option<Value>, StoreError> {
        self.switch.before_read().await?;
        self.inner.get(key).await
    }

    async fn recent_titles(
        &self,
        account_id: u64,
        profile_id: u64,
        limit: usize,
    ) -> Result<RecentTitles, StoreError> {
        self.switch.before_read().await?;
        self.inner
            .recent_titles(account_id, profile_id, limit)
            .await
    }

    async fn purge_older_than(&self, cutoff_ms: u64) -> Result<u64, StoreError> {
        if self.switch.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected write failure".into()));
        }
        self.inner.purge_older_than(cutoff_ms).await
    }

    fn prefers_key_ordered_batches(&self) -> bool {
        self.inner.prefers_key_ordered_batches()
    }

    fn write_health(&self) -> Option<&WriteHealth> {
        Some(&self.health)
    }

    fn encode_metrics(&self, encoder: &mut DescriptorEncoder<'_>) -> Encoded {
        self.inner.encode_metrics(encoder)
    }
}

impl<S: Store> FaultyStore<S> {
    async fn write_batch_with_faults(&self, records: &[StoredRow]) -> Result<(), StoreError> {
        self.switch.write_attempts.fetch_add(1, Ordering::SeqCst);
        let panic_asked = self
            .switch
            .writes_to_panic
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        assert!(!panic_asked, "injected panic in a store write");
        if self.switch.fail_writes.load(Ordering::SeqCst) {
            self.switch.failed_writes.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("injected write failure".into()));
        }
        self.inner.write_rows(records).await?;
        self.switch
            .rows_written
            .fetch_add(records.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    /// Fails like a write while writes fail (an outage takes the journal down too), and
    /// as often as [`FaultSwitch::fail_next_syncs`] asked.
    async fn sync_with_faults(&self) -> Result<(), StoreError> {
        let switch = &self.switch;
        switch.sync_attempts.fetch_add(1, Ordering::SeqCst);
        switch
            .rows_written_before_last_sync
            .store(switch.rows_written(), Ordering::SeqCst);
        let asked = switch
            .syncs_to_fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if asked || switch.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected sync failure".into()));
        }
        self.inner.sync().await
    }
}

/// How often [`watch_fault_file`] looks for its file.
const FAULT_FILE_POLL: Duration = Duration::from_millis(50);

/// Makes `switch`'s store writes fail while a file exists at `path`, checking every 50 ms,
/// until the process ends. Logs each change, so a test can tell the outage began.
pub fn watch_fault_file(switch: Arc<FaultSwitch>, path: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            let exists = tokio::fs::try_exists(&path).await.unwrap_or(false);
            if exists != failing {
                failing = exists;
                switch.set_failing(failing, false);
                tracing::warn!(path = %path.display(), failing, "store write fault injection changed");
            }
            tokio::time::sleep(FAULT_FILE_POLL).await;
        }
    })
}

/// Lets a [`FaultyStore`] wrap whichever store the configuration chose.
#[async_trait]
impl Store for Arc<dyn Store> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    async fn write_batch(&self, records: &[Record]) -> Result<(), StoreError> {
        (**self).write_batch(records).await
    }

    async fn write_rows(&self, rows: &[StoredRow]) -> Result<(), StoreError> {
        (**self).write_rows(rows).await
    }

    async fn get_row(&self, key: Key) -> Result<Option<StoredRow>, StoreError> {
        (**self).get_row(key).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        (**self).sync().await
    }

    async fn get(&self, key: Key) -> Result<Option<Value>, StoreError> {
        (**self).get(key).await
    }

    async fn recent_titles(
        &self,
        account_id: u64,
        profile_id: u64,
        limit: usize,
    ) -> Result<RecentTitles, StoreError> {
        (**self).recent_titles(account_id, profile_id, limit).await
    }

    async fn purge_older_than(&self, cutoff_ms: u64) -> Result<u64, StoreError> {
        (**self).purge_older_than(cutoff_ms).await
    }

    fn prefers_key_ordered_batches(&self) -> bool {
        (**self).prefers_key_ordered_batches()
    }

    fn write_health(&self) -> Option<&WriteHealth> {
        (**self).write_health()
    }

    fn encode_metrics(&self, encoder: &mut DescriptorEncoder<'_>) -> Encoded {
        (**self).encode_metrics(encoder)
    }
}
