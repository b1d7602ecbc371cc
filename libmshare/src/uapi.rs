//! The mshare uAPI: ioctl numbers and argument layouts shared by the daemon and clients.
//!
//! `MSHAREFS_CREATE_MAPPING` and `MSHAREFS_UNMAP` are the kernel's v3 definitions
//! (`include/uapi/linux/msharefs.h`, Aug 2025), byte for byte. `MSHAREFS_GET_INFO` and the
//! attach protocol are msharefs extensions in the same `'x'` range, needed because a
//! hugetlb backing cannot be reached through FUSE passthrough: a client proves its access
//! by passing its open msharefs descriptor to the daemon's attach socket and receives the
//! backing file opened with no more access than that descriptor has.

/// Root file holding the sharing granule as decimal text and a newline.
pub const MSHARE_INFO_NAME: &str = "mshare_info";
/// The granule msharefs reports: the range one shared PMD page-table page covers.
pub const MSHARE_GRANULE: u64 = 1 << 30;
/// Extended attribute that chooses a region's backing before its size is set.
pub const BACKING_XATTR: &str = match BACKING_XATTR_C.to_str() {
    Ok(s) => s,
    Err(_) => panic!("the name is ASCII"),
};
/// [`BACKING_XATTR`] as a C string, for the allocation-free shim.
pub const BACKING_XATTR_C: &std::ffi::CStr = c"user.mshare.backing";
/// Names starting with this are regions being created by libmshare, renamed into place
/// once sized. The daemon removes such a region, if sized, when its last descriptor
/// closes before the rename: its creator died and no one else will ever name it.
pub const CREATING_PREFIX: &str = ".mshare-new.";

// The ioctl argument structs are plain old data (zerocopy's `FromBytes`/`IntoBytes`,
// checked by the compiler: integer fields only, no padding), which is what
// `kernel_glue::fd::ioctl_ptr` requires of a value the kernel writes into.
use zerocopy::{FromBytes, Immutable, IntoBytes};

const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'x' as u32) << 8) | nr
}
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `struct mshare_create` (kernel v3): create an object inside a region.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable)]
pub struct MshareCreate {
    /// Byte offset of the object inside the region.
    pub region_offset: u64,
    /// Object size in bytes.
    pub size: u64,
    /// File offset for file-backed objects (msharefs: must be 0; file objects unsupported).
    pub offset: u64,
    /// `PROT_*`.
    pub prot: u32,
    /// `MAP_*`; must contain `MAP_SHARED | MAP_FIXED`.
    pub flags: u32,
    /// File descriptor for file-backed objects; ignored with `MAP_ANONYMOUS`.
    pub fd: u32,
    /// Tail padding of the C struct (40 bytes in all).
    pub _pad: u32,
}

/// `struct mshare_unmap` (kernel v3): remove an object, discarding its contents.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable)]
pub struct MshareUnmap {
    /// Byte offset inside the region.
    pub region_offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Length of the socket path field of [`MshareRegionInfo`].
pub const SOCKET_PATH_LEN: usize = 112;

/// `struct mshare_region_info` (msharefs extension): what a client needs to attach.
///
/// On the `mshare_info` file it reports only the attach socket (size 0).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable)]
pub struct MshareRegionInfo {
    /// Bytes a mapping of the whole region covers: the size rounded up to the page size
    /// (0 while unset).
    pub size: u64,
    /// Page size of the backing (2 MiB for hugetlb, 4096 otherwise).
    pub page_size: u64,
    /// Sharing granule (1 GiB): attach at an address aligned to it.
    pub granule: u64,
    /// Backing kind, one of `BACKING_*`.
    pub backing: u32,
    /// Layout version of this struct (2).
    pub version: u32,
    /// The size `fstat` reports: `size`, or less for a shared-memory segment whose size is
    /// not a multiple of the page size.
    pub length: u64,
    /// What the region is, one of `KIND_*`.
    pub kind: u32,
    /// Zero.
    pub reserved: u32,
    /// NUL-terminated path of the daemon's attach socket.
    pub socket_path: [u8; SOCKET_PATH_LEN],
}

impl Default for MshareRegionInfo {
    fn default() -> Self {
        MshareRegionInfo {
            size: 0,
            page_size: 0,
            granule: 0,
            backing: 0,
            version: 0,
            length: 0,
            kind: 0,
            reserved: 0,
            socket_path: [0; SOCKET_PATH_LEN],
        }
    }
}

/// [`MshareRegionInfo::kind`]: a region made through the mshare API.
pub const KIND_REGION: u32 = 0;
/// [`MshareRegionInfo::kind`]: the data of a POSIX shared-memory segment (`shm_open`),
/// which may be mapped `MAP_PRIVATE` and at any offset, as the kernel allows.
pub const KIND_POSIX_SHM: u32 = 1;
/// [`MshareRegionInfo::kind`]: the data of a System V shared-memory segment.
pub const KIND_SYSV_SHM: u32 = 2;
/// [`MshareRegionInfo::kind`]: not a region but a directory or `mshare_info` of the
/// mount; only `socket_path` (and `granule`) are set.
pub const KIND_MOUNT: u32 = 3;

/// `MSHAREFS_CREATE_MAPPING = _IOW('x', 0, struct mshare_create)`.
pub const MSHAREFS_CREATE_MAPPING: u32 = ioc(IOC_WRITE, 0, std::mem::size_of::<MshareCreate>());
/// `MSHAREFS_UNMAP = _IOW('x', 1, struct mshare_unmap)`.
pub const MSHAREFS_UNMAP: u32 = ioc(IOC_WRITE, 1, std::mem::size_of::<MshareUnmap>());
/// `MSHAREFS_GET_INFO = _IOR('x', 0x10, struct mshare_region_info)` (msharefs extension).
pub const MSHAREFS_GET_INFO: u32 = ioc(IOC_READ, 0x10, std::mem::size_of::<MshareRegionInfo>());

/// Backing kinds, as in the C header's `MSHARE_BACKING_*`.
pub const BACKING_DEFAULT: u32 = 0;
/// 2 MiB hugetlb pages, shared page tables.
pub const BACKING_HUGETLB: u32 = 1;
/// 2 MiB transparent huge pages on tmpfs.
pub const BACKING_THP: u32 = 2;
/// 4 KiB shmem pages.
pub const BACKING_SHMEM: u32 = 3;

/// Attach protocol: the client sends one request byte with its msharefs descriptor
/// attached; `ATTACH_READ` asks for a read-only backing descriptor, `ATTACH_WRITE` for a
/// read-write one (refused with `EACCES` unless the passed descriptor is open for writing).
pub const ATTACH_READ: u8 = b'r';
/// See [`ATTACH_READ`].
pub const ATTACH_WRITE: u8 = b'w';
/// The daemon answers with a 4-byte native-endian `i32`: 0 with the backing descriptor
/// attached, or a positive errno without one.
pub const ATTACH_REPLY_LEN: usize = 4;

/// Shared-memory requests of the `LD_PRELOAD` shim (see the daemon's `shm.rs`). Every
/// request is one message: the request byte, its fixed-size native-endian payload, and
/// the descriptor it names; the reply is as for attach (`i32` status, a descriptor on
/// success where the request yields one).
///
/// `SHM_POSIX_SIZE` + `u64` length, with a `/dev/shm` descriptor open read-write: make
/// the segment a hugetlb region of that length. Replies with the region file, open
/// read-write.
pub const SHM_POSIX_SIZE: u8 = b'P';
/// `SHM_POSIX_OPEN`, with a `/dev/shm` descriptor: the region file of that segment,
/// opened with the descriptor's access mode; `ENOENT` when the segment is not on msharefs.
pub const SHM_POSIX_OPEN: u8 = b'O';
/// `SHM_RECONCILE`, no payload or descriptor: end the regions of segments that are gone
/// (a `shm_unlink`, a last `shmdt` after `IPC_RMID`) now rather than at the next periodic
/// check. Replies 0.
pub const SHM_RECONCILE: u8 = b'U';
/// `SHM_SYSV_CREATED` + `i32` shmid + `u64` size, from the process that just created that
/// kernel segment: make a hugetlb region hold its data.
pub const SHM_SYSV_CREATED: u8 = b'G';
/// `SHM_SYSV_ATTACH` + `i32` shmid + `u8` write, from a process that has the kernel
/// segment attached (read-write for write): the backing of its region, read-only or
/// read-write; `ENOENT` when the segment is not on msharefs.
pub const SHM_SYSV_ATTACH: u8 = b'A';
/// Extended attribute the daemon sets on the `/dev/shm` file of a POSIX segment whose data
/// lives on msharefs (its value: the region's path in the mount). The shim asks the daemon
/// for the region only when an opened segment carries it.
pub const SHM_PAIRED_XATTR: &std::ffi::CStr = c"user.mshare.region";
/// Longest shared-memory request message.
pub const SHM_REQUEST_MAX: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_v3_header() {
        assert_eq!(std::mem::size_of::<MshareCreate>(), 40);
        assert_eq!(std::mem::size_of::<MshareUnmap>(), 16);
        assert_eq!(MSHAREFS_CREATE_MAPPING, 0x4028_7800);
        assert_eq!(MSHAREFS_UNMAP, 0x4010_7801);
        assert_eq!(std::mem::size_of::<MshareRegionInfo>(), 160);
        assert_eq!(MSHAREFS_GET_INFO, 0x80a0_7810);
    }
}
