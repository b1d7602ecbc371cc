//! System V and POSIX shared memory: the raw `shmget`/`shmat`/`shmdt`/`shmctl` system calls
//! the `LD_PRELOAD` shim makes (it defines those symbols itself, so it must not call the C
//! library's), the kernel's list of segments (`/proc/sysvipc/shm`), and the identity of a
//! POSIX segment's `/dev/shm` file.
//!
//! The system-call wrappers are allocation-free and return `-1`/`MAP_FAILED` with `errno`
//! set, exactly like the C functions, because the shim hands their results straight to
//! its caller.

use std::ffi::c_void;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd};

use crate::check_retval;

/// `IPC_PRIVATE`.
pub const IPC_PRIVATE: i32 = libc::IPC_PRIVATE;
/// `IPC_CREAT`.
pub const IPC_CREAT: i32 = libc::IPC_CREAT;
/// `IPC_EXCL`.
pub const IPC_EXCL: i32 = libc::IPC_EXCL;
/// `IPC_STAT`.
pub const IPC_STAT: i32 = libc::IPC_STAT;
/// `IPC_SET`.
pub const IPC_SET: i32 = libc::IPC_SET;
/// `IPC_RMID`.
pub const IPC_RMID: i32 = libc::IPC_RMID;
/// `SHM_HUGETLB`: the segment is made of huge pages.
pub const SHM_HUGETLB: i32 = libc::SHM_HUGETLB;
/// `SHM_NORESERVE`: no swap (overcommit) reservation for the segment.
pub const SHM_NORESERVE: i32 = libc::SHM_NORESERVE;
/// `SHM_HUGE_SHIFT`: where `SHM_HUGETLB`'s page size (log2) sits.
pub const SHM_HUGE_SHIFT: i32 = 26;
/// `SHM_HUGE_MASK`, after shifting.
pub const SHM_HUGE_MASK: i32 = 0x3f;
/// `SHM_RDONLY`.
pub const SHM_RDONLY: i32 = libc::SHM_RDONLY;
/// `SHM_RND`: round a `shmat` address down to `SHMLBA`.
pub const SHM_RND: i32 = libc::SHM_RND;
/// `SHM_REMAP`: `shmat` may replace mappings at the address.
pub const SHM_REMAP: i32 = 0o40000;
/// `SHM_EXEC`.
pub const SHM_EXEC: i32 = 0o100000;
/// `SHMLBA` on x86-64: the page size.
pub const SHMLBA: usize = 4096;

/// The raw `shmget(2)` system call. Returns the id, or `-1` with `errno` set.
pub fn raw_shmget(key: i32, size: usize, flags: i32) -> i32 {
    // SAFETY: shmget takes plain integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_shmget, key, size, flags) as i32 }
}

/// The raw `shmat(2)` system call. Returns the address, or `(void *)-1` with `errno` set.
///
/// # Safety
/// As `shmat(2)`: with `SHM_REMAP` (or a fixed address) it can replace mappings the
/// caller must own.
pub unsafe fn raw_shmat(id: i32, addr: *const c_void, flags: i32) -> *mut c_void {
    // SAFETY: the caller upholds shmat(2)'s contract; the syscall returns the address or
    // -1 with errno set.
    unsafe { libc::syscall(libc::SYS_shmat, id, addr, flags) as *mut c_void }
}

/// The raw `shmdt(2)` system call. Returns 0, or `-1` with `errno` set.
///
/// # Safety
/// As `shmdt(2)`: it unmaps the attachment at `addr`, which the caller must own.
pub unsafe fn raw_shmdt(addr: *const c_void) -> i32 {
    // SAFETY: the caller owns the attachment at `addr`.
    unsafe { libc::syscall(libc::SYS_shmdt, addr) as i32 }
}

/// The fields of `struct shmid_ds` the shim and the tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmStat {
    /// `shm_perm.__key`.
    pub key: i32,
    /// `shm_perm.uid`.
    pub uid: u32,
    /// `shm_perm.gid`.
    pub gid: u32,
    /// `shm_perm.mode` (permission bits and `SHM_DEST`/`SHM_LOCKED`).
    pub mode: u32,
    /// `shm_segsz`.
    pub segsz: usize,
    /// `shm_cpid`.
    pub cpid: u32,
    /// `shm_nattch`.
    pub nattch: u64,
}

/// Safe wrapper for `shmctl(id, IPC_STAT)`, as a system call (allocation-free).
///
/// # Errors
/// The kernel's errno (`EINVAL`, `EACCES`, `EIDRM`).
pub fn shm_stat(id: i32) -> io::Result<ShmStat> {
    let mut ds = MaybeUninit::<libc::shmid_ds>::zeroed();
    // SAFETY: IPC_STAT writes one shmid_ds into the buffer we own. The x86-64 system call
    // always uses the 64-bit layout, libc's (`IPC_64` must not be added: the kernel
    // refuses it there).
    let r = unsafe {
        libc::syscall(
            libc::SYS_shmctl,
            id,
            IPC_STAT,
            ds.as_mut_ptr() as *mut c_void,
        )
    };
    check_retval(r)?;
    // SAFETY: zero-initialised and filled by the kernel.
    let ds = unsafe { ds.assume_init() };
    Ok(ShmStat {
        key: ds.shm_perm.__key,
        uid: ds.shm_perm.uid,
        gid: ds.shm_perm.gid,
        mode: u32::from(ds.shm_perm.mode),
        segsz: ds.shm_segsz,
        cpid: ds.shm_cpid as u32,
        nattch: ds.shm_nattch,
    })
}

/// Safe wrapper for `shmctl(id, IPC_RMID)`, as a system call.
///
/// # Errors
/// The kernel's errno.
pub fn shm_remove(id: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID reads no buffer.
    let r = unsafe { libc::syscall(libc::SYS_shmctl, id, IPC_RMID, 0usize) };
    check_retval(r).map(drop)
}

/// One line of `/proc/sysvipc/shm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Key (0 once removed with `IPC_RMID`).
    pub key: i32,
    /// Id.
    pub id: i32,
    /// Permission bits (and `SHM_DEST` once removed).
    pub mode: u32,
    /// Size in bytes.
    pub size: u64,
    /// Creator.
    pub cpid: u32,
    /// Attachments.
    pub nattch: u64,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

fn parse_segment(line: &str) -> Option<Segment> {
    let f: Vec<&str> = line.split_ascii_whitespace().collect();
    if f.len() < 10 {
        return None;
    }
    Some(Segment {
        key: f[0].parse().ok()?,
        id: f[1].parse().ok()?,
        mode: u32::from_str_radix(f[2], 8).ok()?,
        size: f[3].parse().ok()?,
        cpid: f[4].parse().ok()?,
        nattch: f[6].parse().ok()?,
        uid: f[7].parse().ok()?,
        gid: f[8].parse().ok()?,
    })
}

/// Every System V segment of the reading process's IPC namespace (`/proc/sysvipc/shm`).
///
/// # Errors
/// Reading the file.
pub fn segments() -> io::Result<Vec<Segment>> {
    let text = std::fs::read_to_string("/proc/sysvipc/shm")?;
    Ok(text.lines().skip(1).filter_map(parse_segment).collect())
}

/// The IPC namespace of process `pid` (the inode of `/proc/PID/ns/ipc`): System V ids
/// mean something only inside one.
///
/// # Errors
/// `ENOENT` for a gone process.
pub fn ipc_namespace(pid: u32) -> io::Result<u64> {
    crate::fd::stat(std::path::Path::new(&format!("/proc/{pid}/ns/ipc"))).map(|s| s.ino)
}

/// The device of the kernel's internal shmem mount, which holds every System V segment
/// (and `MAP_SHARED|MAP_ANONYMOUS` memory): in `/proc/PID/maps`, a segment is a mapping of
/// `/SYSV<key> (deleted)` on this device whose inode number is the shmid. Found by
/// mapping one shared anonymous page and reading our own maps.
///
/// # Errors
/// `mmap` or reading `/proc/self/maps`.
pub fn shmem_device() -> io::Result<u64> {
    // SAFETY: a new one-page shared anonymous mapping at a kernel-chosen address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let found = crate::procfs::maps(std::process::id())
        .map(|maps| maps.iter().find(|m| m.start == p as usize).map(|m| m.dev));
    // SAFETY: the page mapped above, referenced by nothing.
    unsafe { libc::munmap(p, 4096) };
    found?.ok_or_else(|| crate::errno(libc::ENOENT))
}

/// What identifies a POSIX segment's file across reuse of its inode number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Birth time, nanoseconds since the epoch (tmpfs records it).
    pub btime_ns: i128,
}

/// Safe wrapper for `statx(fd, "", AT_EMPTY_PATH, STATX_BTIME|STATX_INO)`.
///
/// # Errors
/// The kernel's errno; `EOPNOTSUPP` when the file system keeps no birth time.
pub fn file_identity(fd: impl AsFd) -> io::Result<FileIdentity> {
    let mut sx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: an empty NUL-terminated path with AT_EMPTY_PATH names `fd` itself; statx
    // writes one struct statx into the buffer we own.
    check_retval(unsafe {
        libc::statx(
            fd.as_fd().as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BTIME | libc::STATX_INO,
            sx.as_mut_ptr(),
        )
    })?;
    // SAFETY: zero-initialised and filled by the kernel.
    let sx = unsafe { sx.assume_init() };
    if sx.stx_mask & libc::STATX_BTIME == 0 {
        return Err(crate::errno(libc::EOPNOTSUPP));
    }
    Ok(FileIdentity {
        dev: libc::makedev(sx.stx_dev_major, sx.stx_dev_minor),
        ino: sx.stx_ino,
        btime_ns: i128::from(sx.stx_btime.tv_sec) * 1_000_000_000
            + i128::from(sx.stx_btime.tv_nsec),
    })
}

/// Safe wrapper for `fsetxattr(2)`.
///
/// # Errors
/// The kernel's errno (`ENOTSUP` where the file system keeps no such attributes).
pub fn fsetxattr(fd: impl AsFd, name: &std::ffi::CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and `value` valid for its length.
    check_retval(unsafe {
        libc::fsetxattr(
            fd.as_fd().as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysvipc_lines_parse() {
        let line = "       0      32769       600      67108864     12345     12346      1     0     0     0     0 1796015753          0 1796015753     4096        0";
        let s = parse_segment(line).unwrap();
        assert_eq!(s.id, 32769);
        assert_eq!(s.mode, 0o600);
        assert_eq!(s.size, 64 << 20);
        assert_eq!(s.cpid, 12345);
        assert_eq!(s.nattch, 1);
        assert!(parse_segment("key shmid perms").is_none());
    }

    #[test]
    fn a_private_segment_is_listed_stated_and_removed() {
        let id = raw_shmget(IPC_PRIVATE, 8192, IPC_CREAT | 0o600);
        assert!(id >= 0, "{}", io::Error::last_os_error());
        let st = shm_stat(id).unwrap();
        assert_eq!((st.segsz, st.nattch, st.mode & 0o777), (8192, 0, 0o600));
        assert_eq!(st.cpid, std::process::id());
        let seg = segments()
            .unwrap()
            .into_iter()
            .find(|s| s.id == id)
            .unwrap();
        assert_eq!(seg.size, 8192);
        // SAFETY: a new attachment at a kernel-chosen address.
        let p = unsafe { raw_shmat(id, std::ptr::null(), 0) };
        assert_ne!(p as isize, -1);
        let dev = shmem_device().unwrap();
        let maps = crate::procfs::maps(std::process::id()).unwrap();
        let m = maps.iter().find(|m| m.start == p as usize).unwrap();
        assert_eq!((m.dev, m.ino), (dev, id as u64));
        assert!(m.path.starts_with("/SYSV"), "{}", m.path);
        assert_eq!(shm_stat(id).unwrap().nattch, 1);
        // SAFETY: our attachment.
        assert_eq!(unsafe { raw_shmdt(p) }, 0);
        shm_remove(id).unwrap();
        assert!(shm_stat(id).is_err());
    }
}
