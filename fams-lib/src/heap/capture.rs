//! Capture: the first steps of the commit path, on the caller's thread — collect the dirty pages
//! from the tracker, compare them with the committed image, build the record and queue it for
//! the log writer (`commit.rs` takes it from there).

use super::*;

impl Heap {
    /// Capture the commit into a queued record (steps 1–3 of the commit path).
    pub(super) fn capture(&mut self) -> Result<Ticket> {
        self.check_writer()?;
        let started = Instant::now();
        let mut dirty = std::mem::take(&mut self.dirty_scratch);
        dirty.clear();
        self.collect_dirty(&mut dirty)?;
        self.stats.collect_ns += started.elapsed().as_nanos() as u64;
        if !self.carried_pages.is_empty() {
            dirty.append(&mut self.carried_pages);
            dirty.sort_unstable();
            dirty.dedup();
        }
        self.stats.pages_tracked += dirty.len() as u64;

        let wait_started = Instant::now();
        let applied_lsn = self.applied_lsn_for(&dirty)?;
        self.stats.write_back_wait_ns += wait_started.elapsed().as_nanos() as u64;
        let mut builder = PayloadBuilder::new();
        let images = crate::images::lock(&self.images);
        for &page in &dirty {
            debug_assert!(page * PAGE_SIZE < self.size);
            let offset = (page * PAGE_SIZE) as u64;
            // SAFETY: page < size / PAGE_SIZE (tracker pages are inside the range it tracks),
            // so the page lies inside the mapping.
            let at = unsafe { self.base.add(page * PAGE_SIZE) };
            // SAFETY: the page lies inside the mapping; no &mut to it exists during this call.
            let current = unsafe { std::slice::from_raw_parts(at, PAGE_SIZE) };
            let in_flight = self.page_last_lsn.get(&page).is_some_and(|&l| l > applied_lsn);
            if in_flight {
                match self.shadow_pages.get(&page) {
                    Some(committed) => builder.add_diff(offset, current, &committed[..]),
                    None => builder.add_full_page(offset, current),
                }
                continue;
            }
            // Diffed in place when the image is held (hot pages): no copy of it first.
            match images.committed(&*self.store, page as u64, &mut self.page_scratch) {
                Ok(committed) => builder.add_diff(offset, current, committed),
                Err(e) => {
                    drop(images);
                    self.carried_pages = dirty.clone();
                    self.dirty_scratch = dirty;
                    return Err(Error::io(&self.path, "reading the committed image of a dirty page", e));
                }
            }
        }
        drop(images);

        let record_bytes = builder.record_bytes();
        let record_max = commit::group_bytes_max(self.capacity_bytes);
        let pages_logged = builder.pages_logged();
        if commit::record_len_max(pages_logged as u64).max(record_bytes) > record_max {
            self.carried_pages = dirty.clone();
            self.dirty_scratch = dirty;
            return Err(Error::CommitTooLarge {
                needed_bytes: commit::record_len_max(pages_logged as u64).max(record_bytes),
                capacity_bytes: record_max,
            });
        }
        self.stats.commits += 1;
        self.stats.bytes_changed += builder.bytes_changed;
        self.stats.full_page_entries += builder.full_pages;
        self.stats.diffed_pages += builder.diffed_pages;
        if builder.entry_count == 0 {
            self.stats.empty_commits += 1;
            self.dirty_scratch = dirty;
            return Ok(Ticket { lsn: self.next_lsn - 1 });
        }
        let lsn = self.next_lsn;
        self.next_lsn += 1;
        let last_lsn = &mut self.page_last_lsn;
        self.shadow_pages.retain(|p, _| last_lsn.get(p).is_some_and(|&l| l > applied_lsn));
        let keep_shadows = dirty.len() <= SHADOW_PAGES_PER_COMMIT_MAX;
        for &page in &dirty {
            last_lsn.insert(page, lsn);
            if keep_shadows {
                // SAFETY: as above, the page lies inside the mapping.
                let at = unsafe { self.base.add(page * PAGE_SIZE) };
                // SAFETY: as above.
                let current = unsafe { std::slice::from_raw_parts(at, PAGE_SIZE) };
                self.shadow_pages.entry(page).or_insert_with(|| Box::new([0u8; PAGE_SIZE])).copy_from_slice(current);
            } else {
                // A stale shadow would be a wrong diff base.
                self.shadow_pages.remove(&page);
            }
        }
        if last_lsn.len() > 4 * dirty.len().max(1024) {
            last_lsn.retain(|_, &mut l| l > applied_lsn);
        }
        self.stats.payload_bytes += builder.payload.len() as u64;
        self.stats.record_bytes += record_bytes;
        {
            let mut st = self.shared.lock();
            st.queued_bytes += builder.payload.len() as u64;
            st.queue.push(QueuedRecord {
                lsn,
                payload: builder.payload,
                entry_count: builder.entry_count,
                pages: pages_logged,
            });
        }
        self.stats.capture_ns += started.elapsed().as_nanos() as u64;
        self.dirty_scratch = dirty;
        Ok(Ticket { lsn })
    }

    /// The LSN up to which the heap file holds committed images, for diffing `dirty`. A dirty
    /// page whose last record is durable but not yet written back would have to be logged whole;
    /// that write-back is microseconds away, so wait for it instead. Pages whose record is not yet
    /// durable (pipelined commits) are logged whole.
    pub(super) fn applied_lsn_for(&self, dirty: &[usize]) -> Result<u64> {
        let mut st = self.shared.lock();
        let durable = st.durable_lsn;
        if st.applied_lsn >= durable {
            return Ok(st.applied_lsn);
        }
        let applied = st.applied_lsn;
        let must_wait = dirty.iter().any(|p| self.page_last_lsn.get(p).is_some_and(|&l| l > applied && l <= durable));
        while must_wait && st.applied_lsn < durable {
            if let Some(reason) = &st.failed {
                return Err(commit::poisoned(&self.log_path, reason));
            }
            st = self.shared.progress.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Ok(st.applied_lsn)
    }

    /// Ask the tracker for the dirty pages. If it fails part way, pages it already re-armed
    /// are lost to us and the next commit could miss their writes: refuse all further commits
    /// (reopening recovers the last committed state) rather than risk a partial commit.
    pub(super) fn collect_dirty(&mut self, dirty: &mut Vec<usize>) -> Result<()> {
        if let Err(e) = self.tracker.collect(dirty) {
            let reason = format!("dirty-page tracking failed ({e}); writes since the last commit cannot be captured");
            self.shared.fail(reason);
            return Err(Error::Tracker(e));
        }
        Ok(())
    }
}
