//! Checkpoints: making the heap file hold what the log holds, so the log's tail can move on.
//!
//! A checkpoint has three steps, always in this order:
//! 1. write every committed page image held in memory (`images.rs`) into the heap file;
//! 2. `fdatasync` the heap file;
//! 3. write a superblock (one durable write) whose tail is where replay must start now.
//!
//! # On the committing path, or beside it
//!
//! Step 2 is the expensive one (a device flush: ~0.1–5 ms on disks, far more than a commit on a
//! fast device), and it used to run inside whichever `commit()` crossed the threshold. Now, with
//! a thread of its own (the default), the log writer only *asks* for a checkpoint when the log
//! passes the threshold and goes on; the heap-file thread here (`fams-checkpoint`) takes it in
//! three phases, holding the log writer's lock only for the first and the last:
//!
//! * **plan** (writer lock held, between two groups): note the head, the bytes in use and the
//!   next LSN — the tail the checkpoint will move to — and start a new round of whole-page
//!   logging (`full_image_logged` is cleared), as a checkpoint always did;
//! * **write and sync** (no writer lock): write the images in batches (each copied under the
//!   images' lock, written without it), then `fdatasync`. Commits go on meanwhile, groups are
//!   written to the log after the planned tail;
//! * **move the tail** (writer lock held): write the superblock with the planned tail, unless a
//!   synchronous checkpoint overtook this one (a group that would not fit in the log, or the
//!   final checkpoint at close), which already moved the tail further.
//!
//! Without the thread (`WriterMode::Manual`, or `HeapOptions::images_only_at_checkpoints`, for
//! simulations that replay a seed's I/O operations in order) the three steps run at once, on the
//! thread that wrote the group that crossed the threshold, as before.
//!
//! # Why moving the tail to the planned point is safe
//!
//! Recovery replays from the tail. It needs: every record before the planned tail to be in the
//! heap file durably, and every page the heap file may hold torn to be rebuilt whole by a record
//! after the tail.
//! * Records up to the plan were all applied to the images when it was made (each group is
//!   applied before the writer lets go of its lock). Each image present then is written before
//!   the `fdatasync` begins: by this checkpoint's batches, or earlier by another flush (a full
//!   flush under the lock writes and forgets; a batch forgets a page only if no record changed
//!   it since its copy). So the sync covers the state of every page as of the plan, or a newer
//!   one.
//! * A page whose image changed after the plan, and any page the heap file gets written later
//!   (even during the sync, by another flush: only pages changed after the plan still have
//!   images then), was changed by a record after the plan — and the first such record of each
//!   page carries its whole image, because the plan began a new round of whole-page logging.
//!   Replay rebuilds those pages from the log, whatever the heap file holds.
//! * Until the superblock is durable, the old tail stands, and the log space between the old
//!   tail and the planned one is not reused (the space counts as in use until step 3), so a crash
//!   at any point replays from the old tail exactly as before.
//!
//! The written limit (see `log_format`) starts fresh from the new tail, as at every checkpoint,
//! but never below the end of the records written since the plan: nothing of this epoch lies past
//! them, and the writer raises the limit before a group would run past it.
//!
//! Negative controls (`mutations` builds): `checkpoint-without-image-flush` and
//! `checkpoint-without-heap-sync` skip step 1 or 2 in both forms; `background-checkpoint-tail-at-
//! head` moves the tail to the head of the moment instead of the planned one, dropping from replay
//! the records written during the sync, whose images the heap file may lack.

use crate::commit::{lock_core, panic_message, LogWriter, Shared, WriterCore};
use crate::heap_file::PAGE_SIZE;
use crate::mutations::{self, Mutation};
use crate::recovery::write_superblock;

/// A checkpoint planned by the log writer and taken on the heap-file thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CheckpointPlan {
    /// Tells this checkpoint from one that overtook it.
    id: u64,
    /// The new tail: the log's head when the plan was made.
    tail_offset: u64,
    /// The LSN of the first record at or after that head.
    tail_lsn: u64,
    /// Bytes in use from the old tail to the new one.
    used_bytes: u64,
}

/// Committed images the heap-file thread copies per batch (the images' lock is held only to copy
/// them, ~20 µs, not while they are written).
pub(crate) const IMAGE_BATCH_PAGES: usize = 64;

impl LogWriter {
    /// Take a whole checkpoint now, on this thread (see the module docs). Overtakes a planned
    /// one: its tail would be behind this one's.
    pub(crate) fn checkpoint(&mut self) -> Result<(), String> {
        self.planned_checkpoint = None;
        let plan = self.plan_checkpoint();
        write_and_sync(&self.images, &*self.heap_file, &self.heap_path, None)?;
        self.move_tail(plan)
    }

    /// Plan a checkpoint at the current head (module docs, "plan"). Runs between groups: every
    /// durable record is applied to the images.
    fn plan_checkpoint(&mut self) -> CheckpointPlan {
        let tail_lsn = {
            let st = self.shared.lock();
            assert_eq!(st.applied_lsn, st.durable_lsn, "a checkpoint is planned between groups only");
            st.applied_lsn + 1
        };
        self.checkpoint_plans += 1;
        let plan =
            CheckpointPlan { id: self.checkpoint_plans, tail_offset: self.head, tail_lsn, used_bytes: self.used_bytes };
        self.full_image_logged.clear();
        plan
    }

    /// Step 3: the superblock with the plan's tail. Nothing if another checkpoint overtook it.
    fn move_tail(&mut self, plan: CheckpointPlan) -> Result<(), String> {
        let mut plan = plan;
        if mutations::is_on(Mutation::BackgroundCheckpointTailAtHead) {
            let applied_lsn = self.shared.lock().applied_lsn;
            plan = CheckpointPlan { tail_offset: self.head, tail_lsn: applied_lsn + 1, used_bytes: self.used_bytes, ..plan };
        }
        assert!(plan.used_bytes <= self.used_bytes, "the planned tail is behind the head");
        let used_after = self.used_bytes - plan.used_bytes;
        let mut sb = self.superblock;
        sb.sequence += 1;
        sb.tail_offset = plan.tail_offset;
        sb.tail_lsn = plan.tail_lsn;
        sb.checkpoints += 1;
        // A fresh limit from the new tail, as far as the records written since the plan at least
        // (the writer raises it before any group that would end past it).
        sb.written_limit_bytes = sb.fresh_written_limit().max(used_after);
        assert!(sb.written_limit_bytes <= sb.capacity_bytes());
        if !sb.counters_writable() {
            return Err(format!("{}: the log's counters are at their limit ({sb:?})", self.log_path.display()));
        }
        write_superblock(self.dev.as_mut(), &sb)
            .map_err(|e| format!("{}: writing the superblock at checkpoint: {e}", self.log_path.display()))?;
        self.superblock = sb;
        self.used_bytes = used_after;
        let mut st = self.shared.lock();
        st.stats.checkpoints += 1;
        st.stats.heap_fdatasyncs += 1;
        st.io = self.dev.stats();
        Ok(())
    }

    /// The log has passed its threshold: checkpoint now, or ask the heap-file thread to.
    pub(crate) fn checkpoint_due(&mut self) -> Result<(), String> {
        if !self.checkpoints_in_background {
            return self.checkpoint();
        }
        let mut st = self.shared.lock();
        if !st.checkpoint_wanted {
            st.checkpoint_wanted = true;
            self.shared.background.notify_one();
        }
        Ok(())
    }

    /// A checkpoint nears: ask the heap-file thread to write images while it can, so the
    /// checkpoint has little left to write. Only once a batch has gathered (one wake-up per batch,
    /// not per commit), and never without that thread.
    pub(crate) fn images_due(&mut self) {
        if !self.checkpoints_in_background {
            return;
        }
        let (held, bytes_max) = {
            let images = crate::images::lock(&self.images);
            (images.len(), images.bytes_max())
        };
        let near = self.used_bytes > self.checkpoint_threshold_bytes / 2 || held * PAGE_SIZE > bytes_max / 2;
        if held >= IMAGE_BATCH_PAGES && near {
            let mut st = self.shared.lock();
            if !st.flush_images {
                st.flush_images = true;
                self.shared.background.notify_one();
            }
        }
    }
}

/// Steps 1 and 2: write every image into the heap file, then `fdatasync` it. With `keep_going`
/// (beside the commits) the images are written in batches, each copied under the images' lock and
/// written without it, and `keep_going` may stop the writing between batches (then nothing is
/// synced and Ok(false) is returned); without it (the log writer's lock held, no record can change
/// an image) in one pass under the lock.
fn write_and_sync(
    images: &crate::images::SharedImages,
    store: &dyn crate::storage::HeapStore,
    heap_path: &std::path::Path,
    keep_going: Option<&dyn Fn() -> bool>,
) -> Result<bool, String> {
    if !mutations::is_on(Mutation::CheckpointWithoutImageFlush) {
        let written = match keep_going {
            Some(keep_going) => crate::images::write_in_batches(images, store, IMAGE_BATCH_PAGES, keep_going),
            None => crate::images::flush_all(images, store).map(|()| true),
        };
        let done = written.map_err(|e| {
            format!("{}: writing committed pages into the heap file at checkpoint: {e}", heap_path.display())
        })?;
        if !done {
            return Ok(false);
        }
    }
    if !mutations::is_on(Mutation::CheckpointWithoutHeapSync) {
        store.sync_data().map_err(|e| format!("{}: fdatasync at checkpoint: {e}", heap_path.display()))?;
    }
    Ok(true)
}

/// What the heap-file thread was asked to do.
enum Job {
    Checkpoint,
    WriteImages,
}

/// The heap-file thread (`fams-checkpoint`): takes checkpoints and writes committed images in
/// the background, until the heap shuts down or fails. A panic in it (a bug) fails the heap.
pub(crate) fn run_heap_file_thread(core: WriterCore, shared: std::sync::Arc<Shared>) {
    let body = std::panic::AssertUnwindSafe(|| loop {
        let job = {
            let mut st = shared.lock();
            while !st.checkpoint_wanted && !st.flush_images && !st.shutdown && st.failed.is_none() {
                st = shared.background.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.shutdown || st.failed.is_some() {
                return;
            }
            if st.checkpoint_wanted {
                st.checkpoint_wanted = false;
                Job::Checkpoint
            } else {
                st.flush_images = false;
                Job::WriteImages
            }
        };
        let done = match job {
            Job::Checkpoint => background_checkpoint(&core, &shared),
            Job::WriteImages => write_images(&core, &shared),
        };
        if let Err(reason) = done {
            shared.fail(reason);
            return;
        }
    });
    if let Err(payload) = std::panic::catch_unwind(body) {
        shared.fail(format!("the heap-file thread panicked: {}", panic_message(payload.as_ref())));
    }
}

/// Stop background work between batches: the heap is closing or failed, or (for image writing) a
/// checkpoint is wanted, which writes them all anyway.
fn should_stop(shared: &Shared, for_images: bool) -> bool {
    let st = shared.lock();
    st.shutdown || st.failed.is_some() || (for_images && st.checkpoint_wanted)
}

/// A checkpoint in three phases (module docs).
fn background_checkpoint(core: &WriterCore, shared: &Shared) -> Result<(), String> {
    let (plan, images, store, heap_path) = {
        let mut w = lock_core(core);
        if w.used_bytes <= w.checkpoint_threshold_bytes || shared.lock().failed.is_some() {
            return Ok(()); // a synchronous checkpoint came first
        }
        let plan = w.plan_checkpoint();
        w.planned_checkpoint = Some(plan.id);
        (plan, w.images.clone(), w.heap_file.clone(), w.heap_path.clone())
    };
    #[cfg(test)]
    hold_while_set(&shared.hold_checkpoint_before_sync, shared);
    if !write_and_sync(&images, &*store, &heap_path, Some(&|| !should_stop(shared, false)))? {
        return Ok(()); // closing: the final checkpoint takes over
    }
    #[cfg(test)]
    hold_while_set(&shared.hold_checkpoint_before_tail, shared);
    let mut w = lock_core(core);
    if w.planned_checkpoint != Some(plan.id) || shared.lock().failed.is_some() {
        return Ok(());
    }
    w.planned_checkpoint = None;
    w.move_tail(plan)?;
    shared.lock().stats.background_checkpoints += 1;
    Ok(())
}

/// Tests: wait while `flag` is set (or until shutdown).
#[cfg(test)]
fn hold_while_set(flag: &std::sync::atomic::AtomicBool, shared: &Shared) {
    while flag.load(std::sync::atomic::Ordering::SeqCst) && !shared.lock().shutdown {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Write the committed images into the heap file (page cache, no sync) in batches, until none
/// of those present at the start is left, a checkpoint is wanted, or the heap closes or fails.
fn write_images(core: &WriterCore, shared: &Shared) -> Result<(), String> {
    let (images, store, heap_path) = {
        let w = lock_core(core);
        (w.images.clone(), w.heap_file.clone(), w.heap_path.clone())
    };
    crate::images::write_in_batches(&images, &*store, IMAGE_BATCH_PAGES, &|| !should_stop(shared, true))
        .map(|_| ())
        .map_err(|e| format!("{}: writing committed pages into the heap file: {e}", heap_path.display()))
}
