//! io_uring with a mapping registered as fixed buffers (`IORING_REGISTER_BUFFERS`), as
//! databases register their buffer pools: the kernel pins the pages once and reads and
//! writes them without looking them up again. Built on the `io-uring` crate (the
//! tokio-rs binding of the kernel ABI) rather than raw syscalls: the ring setup and its
//! memory barriers are easy to get subtly wrong.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use io_uring::{IoUring, opcode, types};

use crate::mapping::{Mapping, Protection};

/// Largest fixed buffer the kernel registers (`SZ_1G` in `io_uring/rsrc.c`).
const MAX_BUFFER: u64 = 1 << 30;

/// A ring with every 1 GiB piece of a mapping registered as one fixed buffer; the
/// registration ends with the value, which cannot outlive the mapping.
pub struct FixedBuffers<'m> {
    ring: IoUring,
    m: &'m Mapping,
}

impl std::fmt::Debug for FixedBuffers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedBuffers")
            .field("mapping", self.m)
            .finish()
    }
}

impl<'m> FixedBuffers<'m> {
    /// Sets up a ring and registers `m` as fixed buffers of at most 1 GiB each.
    ///
    /// # Errors
    /// `io_uring_setup(2)` and `io_uring_register(2)` errors (`ENOMEM` when the pages
    /// cannot be pinned, `EFAULT`, `EPERM`).
    pub fn register(m: &'m Mapping) -> io::Result<FixedBuffers<'m>> {
        let ring = IoUring::new(8)?;
        let mut iovecs = Vec::new();
        let mut off = 0u64;
        while off < m.len() as u64 {
            let len = MAX_BUFFER.min(m.len() as u64 - off);
            iovecs.push(libc::iovec {
                iov_base: (m.addr() + off as usize) as *mut libc::c_void,
                iov_len: len as usize,
            });
            off += len;
        }
        // SAFETY: every iovec lies inside `m`, which outlives the ring (the lifetime ties
        // them), and the ring is dropped, unregistering the buffers, before `m` can be.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        Ok(FixedBuffers { ring, m })
    }

    /// The buffer index and pointer of `[offset, offset + len)`, which must lie inside
    /// one registered buffer.
    fn locate(&self, offset: u64, len: u64) -> io::Result<(u16, *mut u8, u32)> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| crate::errno(libc::EINVAL))?;
        let index = offset / MAX_BUFFER;
        if end > self.m.len() as u64 || len == 0 || (end - 1) / MAX_BUFFER != index {
            return Err(crate::errno(libc::EINVAL));
        }
        let len = u32::try_from(len).map_err(|_| crate::errno(libc::EINVAL))?;
        Ok((
            index as u16,
            self.m.as_ptr().wrapping_add(offset as usize),
            len,
        ))
    }

    fn run(&mut self, entry: io_uring::squeue::Entry) -> io::Result<usize> {
        // SAFETY: the entry's buffer lies inside the registered, live mapping and its
        // file descriptor outlives this call, which waits for the completion.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| crate::errno(libc::EBUSY))?;
        self.ring.submit_and_wait(1)?;
        let cqe = self
            .ring
            .completion()
            .next()
            .ok_or_else(|| crate::errno(libc::EIO))?;
        if cqe.result() < 0 {
            return Err(crate::errno(-cqe.result()));
        }
        Ok(cqe.result() as usize)
    }

    /// `IORING_OP_WRITE_FIXED`: writes `[offset, offset + len)` of the mapping to `fd` at
    /// `file_offset`; returns the bytes written.
    ///
    /// # Errors
    /// `EINVAL` for a range outside one buffer; the operation's errno.
    pub fn write_fixed(
        &mut self,
        fd: impl AsFd,
        offset: u64,
        len: u64,
        file_offset: u64,
    ) -> io::Result<usize> {
        let (index, ptr, len) = self.locate(offset, len)?;
        let raw = fd.as_fd().as_raw_fd();
        let e = opcode::WriteFixed::new(types::Fd(raw), ptr, len, index)
            .offset(file_offset)
            .build();
        self.run(e)
    }

    /// `IORING_OP_READ_FIXED`: reads from `fd` at `file_offset` into `[offset, offset +
    /// len)` of the mapping; returns the bytes read.
    ///
    /// # Errors
    /// `EACCES` for a read-only mapping; `EINVAL` for a range outside one buffer; the
    /// operation's errno.
    pub fn read_fixed(
        &mut self,
        fd: impl AsFd,
        offset: u64,
        len: u64,
        file_offset: u64,
    ) -> io::Result<usize> {
        if self.m.protection() != Protection::ReadWrite {
            return Err(crate::errno(libc::EACCES));
        }
        let (index, ptr, len) = self.locate(offset, len)?;
        let raw = fd.as_fd().as_raw_fd();
        let e = opcode::ReadFixed::new(types::Fd(raw), ptr, len, index)
            .offset(file_offset)
            .build();
        self.run(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_buffer_round_trip_through_a_file() {
        let fd = crate::fd::memfd_create("kg-uring", false).unwrap();
        crate::fd::ftruncate(&fd, 1 << 20).unwrap();
        let m = Mapping::map_aligned(&fd, 1 << 20, Protection::ReadWrite, 4096).unwrap();
        m.store_u64(0, 0x1234).unwrap();
        let file = crate::fd::memfd_create("kg-uring-file", false).unwrap();
        let mut ring = match FixedBuffers::register(&m) {
            Ok(r) => r,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => return,
            Err(e) => panic!("io_uring: {e}"),
        };
        assert_eq!(ring.write_fixed(&file, 0, 4096, 0).unwrap(), 4096);
        assert_eq!(ring.read_fixed(&file, 8192, 4096, 0).unwrap(), 4096);
        assert_eq!(m.load_u64(8192).unwrap(), 0x1234);
        assert!(ring.write_fixed(&file, (1 << 20) - 8, 16, 0).is_err());
    }
}
