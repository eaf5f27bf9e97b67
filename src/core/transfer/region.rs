//! Memory a transfer agent can move: anonymous shared memory (a memfd) mapped into this process, so that a
//! same-host peer can map the very same pages (shm backend) while the tcp backend reads and writes it in place.
//!
//! A region is raw bytes shared with transfers in flight, not a Rust slice: its owner promises not to read
//! the bytes a transfer is writing, nor change the bytes it is reading, until that transfer completes (the
//! engine keeps such pages out of its schedule). Everything here checks ranges before it touches memory.
use memmap2::MmapRaw;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("cannot create shared memory of {len} bytes: {source}")]
    Create { len: u64, source: std::io::Error },
    #[error("cannot map shared memory of {len} bytes: {source}")]
    Map { len: u64, source: std::io::Error },
}

/// One registered piece of memory.
pub struct Region {
    map: MmapRaw,
    /// Kept open so the memory can be handed to same-host peers.
    file: File,
}

// SAFETY: the mapping is plain memory; the rules of access are the ones in the module doc.
unsafe impl Send for Region {}
// SAFETY: as for Send.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("len", &self.len()).finish()
    }
}

impl Region {
    /// `len` bytes of zeroed shared memory.
    pub fn new(len: u64) -> Result<Self, RegionError> {
        // SAFETY: a C string literal and valid flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"dynamo-kv".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(RegionError::Create { len, source: std::io::Error::last_os_error() });
        }
        // SAFETY: a descriptor just returned to us and owned by nobody else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(len).map_err(|source| RegionError::Create { len, source })?;
        Self::from_file(file, len)
    }

    /// Maps a peer's region whose descriptor arrived over the shm socket; its length is the file's.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, RegionError> {
        let file = File::from(fd);
        let len = file.metadata().map_err(|source| RegionError::Map { len: 0, source })?.len();
        Self::from_file(file, len)
    }

    fn from_file(file: File, len: u64) -> Result<Self, RegionError> {
        if len == 0 {
            return Err(RegionError::Map { len, source: std::io::Error::other("a region must not be empty") });
        }
        let map = memmap2::MmapOptions::new()
            .len(usize::try_from(len).map_err(|e| RegionError::Map { len, source: std::io::Error::other(e) })?)
            .map_raw(&file)
            .map_err(|source| RegionError::Map { len, source })?;
        if len >= 2 << 20 {
            // Huge pages where the system allows them for shared memory (`shmem_enabled`: advise): an engine's
            // attention reads pages scattered over the cache, and 4 KiB mappings cost it TLB misses.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Self { map, file })
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// The first byte: for owners that lay typed data over the region (an engine's KV pages), under the
    /// module's rules.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// Whether `offset..offset + len` lies inside the region.
    pub fn holds(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len())
    }

    /// The bytes `offset..offset + len` to read, or `None` outside the region.
    ///
    /// # Safety
    /// Nothing may write these bytes while the slice lives (see the module doc).
    pub unsafe fn bytes(&self, offset: u64, len: u64) -> Option<&[u8]> {
        // SAFETY: in bounds (checked), and the caller keeps writers away.
        self.holds(offset, len)
            .then(|| unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset as usize), len as usize) })
    }

    /// The bytes `offset..offset + len` to write, or `None` outside the region.
    ///
    /// # Safety
    /// Nothing else may read or write these bytes while the slice lives (see the module doc).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, offset: u64, len: u64) -> Option<&mut [u8]> {
        // SAFETY: in bounds (checked), and the caller keeps every other access away.
        self.holds(offset, len).then(|| unsafe {
            std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(offset as usize), len as usize)
        })
    }

    /// Copies `len` bytes from `self` at `from` to `target` at `to`; false (and nothing copied) when either
    /// range is outside its region.
    pub fn copy_to(&self, from: u64, target: &Region, to: u64, len: u64) -> bool {
        if !self.holds(from, len) || !target.holds(to, len) {
            return false;
        }
        // SAFETY: both ranges are in bounds; `copy` allows overlap (the same region on both sides); the owners'
        // promise keeps other accesses away while a transfer runs.
        unsafe {
            std::ptr::copy(self.map.as_ptr().add(from as usize), target.map.as_mut_ptr().add(to as usize), len as usize)
        };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_is_zeroed_shared_memory_and_refuses_ranges_outside_it() {
        let region = Region::new(4096).unwrap();
        assert_eq!(region.len(), 4096);
        // SAFETY: nothing else touches the region in this test.
        unsafe {
            assert!(region.bytes(0, 4096).unwrap().iter().all(|&b| b == 0));
            region.bytes_mut(4000, 96).unwrap().fill(7);
            assert!(region.bytes(4000, 97).is_none());
            assert!(region.bytes(u64::MAX, 2).is_none(), "an overflowing range is outside, not wrapped");
        }
        // The same memory through a second mapping of its descriptor, as a same-host peer sees it.
        let fd = rustix_dup(region.fd());
        let peer = Region::from_fd(fd).unwrap();
        assert_eq!(peer.len(), 4096);
        // SAFETY: as above.
        unsafe { assert_eq!(peer.bytes(4000, 96).unwrap(), &[7; 96][..]) };
        assert!(region.copy_to(4000, &peer, 0, 96));
        // SAFETY: as above.
        unsafe { assert_eq!(region.bytes(0, 96).unwrap(), &[7; 96][..]) };
        assert!(!region.copy_to(4000, &peer, 4090, 96), "a copy past the target's end does nothing");
        assert!(Region::new(0).is_err());
    }

    fn rustix_dup(fd: std::os::fd::RawFd) -> OwnedFd {
        // SAFETY: dup of a descriptor we hold; the result is checked and owned by the caller.
        let copy = unsafe { libc::dup(fd) };
        assert!(copy >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        unsafe { OwnedFd::from_raw_fd(copy) }
    }
}
