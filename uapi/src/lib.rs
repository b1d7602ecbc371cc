//! What the msharefs daemon and its clients agree on, and nothing else: the mshare uAPI
//! (ioctl numbers and argument layouts), the backing kinds, and the attach socket's
//! requests and replies. The daemon depends on this crate, never on the client library.
//!
//! `MSHAREFS_CREATE_MAPPING` and `MSHAREFS_UNMAP` are the kernel's v3 definitions
//! (`include/uapi/linux/msharefs.h`, Aug 2025), byte for byte. `MSHAREFS_GET_INFO` and the
//! attach protocol are msharefs extensions in the same `'x'` range, needed because a
//! hugetlb backing cannot be reached through FUSE passthrough: a client proves its access
//! by passing its open msharefs descriptor to the daemon's attach socket and receives the
//! backing file opened with no more access than that descriptor has, with the region's
//! [`MshareRegionInfo`] in the same reply (one datagram and its reply per attach; see
//! [`ATTACH_READ`]).

/// Root file holding the sharing granule as decimal text and a newline.
pub const MSHARE_INFO_NAME: &str = "mshare_info";
/// Inode number of the `mshare_info` file (the root directory is 1): the one regular file
/// of a mount that is not a region.
pub const MSHARE_INFO_INO: u64 = 2;
/// The granule msharefs reports: the range one shared PMD page-table page covers.
pub const MSHARE_GRANULE: u64 = 1 << 30;
/// Whether the mappings of a hugetlb region of `size` bytes cover its last, partial
/// granule whole (a `MAP_NORESERVE` mapping of a whole granule reaching past the end of the
/// file), which every party that maps the region must agree on: the kernel shares a page
/// table only between mappings that cover its whole range with the same flags. Done when
/// the region spans at least one whole granule, so that the address space added is less
/// than the region itself; a smaller region is mapped as it is (one unshared 4 KiB table).
pub fn covers_last_granule(size: u64) -> bool {
    size > MSHARE_GRANULE && size % MSHARE_GRANULE != 0
}

/// A size as people write one, the one grammar of msharefs's command line, mount options
/// and the shim's environment: digits, then optionally `k`, `M`, `G` or `T` (powers of
/// 1024, any case), then optionally `B` or, after a unit, `iB` (`123`, `123B`, `64k`,
/// `16G`, `16GB`, `16GiB`). `None` for anything else or past 2^64 - 1. Allocation-free.
pub fn parse_size(s: &[u8]) -> Option<u64> {
    let digits = s.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut n: u64 = 0;
    for &c in &s[..digits] {
        n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    let rest = &s[digits..];
    let (shift, rest) = match rest.first().map(u8::to_ascii_lowercase) {
        Some(b'k') => (10, &rest[1..]),
        Some(b'm') => (20, &rest[1..]),
        Some(b'g') => (30, &rest[1..]),
        Some(b't') => (40, &rest[1..]),
        _ => (0, rest),
    };
    let suffix_ok = match rest {
        b"" | b"B" | b"b" => true,
        b"iB" | b"ib" => shift != 0,
        _ => false,
    };
    if !suffix_ok {
        return None;
    }
    n.checked_mul(1u64 << shift)
}

/// Directory in which each daemon links its attach socket under the device number of its
/// mount, as `MAJOR:MINOR` in decimal (`/proc/self/mountinfo`'s notation): a client that
/// has a region's descriptor finds the daemon's socket from `fstat` alone, without asking
/// the daemon (`MSHAREFS_GET_INFO`), and an attach is then one request. Only root writes
/// here. An entry is a hint: one left by a daemon that died may name a socket nobody is
/// bound to any more, and a daemon refuses a descriptor of another mount (`EBADF`).
pub const BY_DEV_DIR: &str = "/run/msharefs/by-dev";

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
    /// `FLAG_*` bits.
    pub flags: u32,
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
            flags: 0,
            socket_path: [0; SOCKET_PATH_LEN],
        }
    }
}

/// [`MshareRegionInfo::flags`]: the mount guards `MSHAREFS_UNMAP` (`msharefs mount
/// --unmap-guard`): every mapping of the region must be registered for userfaultfd missing
/// faults with `SIGBUS` (libmshare's `guard::arm`), or it shares no page table with the
/// daemon's, which are.
pub const FLAG_UNMAP_GUARD: u32 = 1;

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

/// Where a region's data lives; see the README's backing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backing {
    /// The mount's default.
    Default,
    /// 2 MiB hugetlb pages with shared page tables.
    Hugetlb,
    /// 2 MiB transparent huge pages (tmpfs `huge=always`).
    Thp,
    /// 4 KiB shmem pages.
    Shmem,
}

/// Size of a hugetlb page (x86-64 PMD size).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// Size of a base page.
pub const PAGE_SIZE: u64 = 4096;

impl Backing {
    /// From the uAPI / C value (`MSHARE_BACKING_*`); `None` for an unknown value.
    pub fn from_raw(v: u32) -> Option<Backing> {
        Some(match v {
            BACKING_DEFAULT => Backing::Default,
            BACKING_HUGETLB => Backing::Hugetlb,
            BACKING_THP => Backing::Thp,
            BACKING_SHMEM => Backing::Shmem,
            _ => return None,
        })
    }

    /// The uAPI / C value.
    pub fn raw(self) -> u32 {
        match self {
            Backing::Default => BACKING_DEFAULT,
            Backing::Hugetlb => BACKING_HUGETLB,
            Backing::Thp => BACKING_THP,
            Backing::Shmem => BACKING_SHMEM,
        }
    }

    /// The name used by the `user.mshare.backing` xattr and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Backing::Default => "default",
            Backing::Hugetlb => "hugetlb",
            Backing::Thp => "thp",
            Backing::Shmem => "shmem",
        }
    }

    /// Parses a name as written by [`Backing::name`].
    pub fn from_name(s: &str) -> Option<Backing> {
        Some(match s {
            "default" => Backing::Default,
            "hugetlb" => Backing::Hugetlb,
            "thp" => Backing::Thp,
            "shmem" => Backing::Shmem,
            _ => return None,
        })
    }

    /// Page size of the backing.
    pub fn page_size(self) -> u64 {
        match self {
            Backing::Hugetlb => HUGE_PAGE_SIZE,
            _ => PAGE_SIZE,
        }
    }
}

/// The attach socket is a datagram socket. A request is one datagram: the request bytes,
/// with descriptors attached (`SCM_RIGHTS`): first the socket the reply goes to (one end
/// of a stream socket pair whose other end the client keeps), then the descriptor the
/// request names, if any. The kernel adds the sender's credentials (`SCM_CREDENTIALS`).
/// A request without a reply socket is dropped unanswered. Every reply is written to the
/// reply socket, which the daemon then closes.
///
/// Attach: one request byte with the client's msharefs descriptor; `ATTACH_READ` asks
/// for a read-only backing descriptor, `ATTACH_WRITE` for a read-write one (refused with
/// `EACCES` unless the passed descriptor is open for writing). Only the first byte counts.
pub const ATTACH_READ: u8 = b'r';
/// See [`ATTACH_READ`].
pub const ATTACH_WRITE: u8 = b'w';

/// Every reply of the attach socket starts with a native-endian `i32` status: 0, or a
/// positive errno. A failure is just that status (4 bytes); a success is an
/// [`AttachReply`] (with the descriptor the request yields, if any, attached).
pub const STATUS_LEN: usize = 4;

/// The reply to a request that succeeded: the status (0) and, for a request about a
/// region, the region's info as `MSHAREFS_GET_INFO` reports it (zeros otherwise).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable)]
pub struct AttachReply {
    /// 0.
    pub status: i32,
    /// Zero.
    pub reserved: u32,
    /// The region's info.
    pub info: MshareRegionInfo,
}

/// Shared-memory requests of the `LD_PRELOAD` shim (see the daemon's `shm.rs`). Every
/// request is one message: the request byte, its fixed-size native-endian payload, and
/// the descriptor it names (build them with [`ShmRequest`]); the reply is as for attach
/// (a status, or an [`AttachReply`] with a descriptor where the request yields one).
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

/// A shared-memory request: the request byte and its payload, built without allocating.
#[derive(Debug, Clone, Copy)]
pub struct ShmRequest {
    buf: [u8; SHM_REQUEST_MAX],
    len: usize,
}

impl ShmRequest {
    fn new(kind: u8) -> ShmRequest {
        let mut buf = [0; SHM_REQUEST_MAX];
        buf[0] = kind;
        ShmRequest { buf, len: 1 }
    }

    fn with(mut self, bytes: &[u8]) -> ShmRequest {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        self
    }

    /// Make the POSIX segment sent with it a region of `length` bytes.
    pub fn posix_size(length: u64) -> ShmRequest {
        Self::new(SHM_POSIX_SIZE).with(&length.to_ne_bytes())
    }

    /// The region file of the POSIX segment sent with it.
    pub fn posix_open() -> ShmRequest {
        Self::new(SHM_POSIX_OPEN)
    }

    /// End the regions of segments that are gone, now.
    pub fn reconcile() -> ShmRequest {
        Self::new(SHM_RECONCILE)
    }

    /// The System V segment `id` of `size` bytes was just created by the sender.
    pub fn sysv_created(id: i32, size: u64) -> ShmRequest {
        Self::new(SHM_SYSV_CREATED)
            .with(&id.to_ne_bytes())
            .with(&size.to_ne_bytes())
    }

    /// The backing of System V segment `id`, which the sender has attached.
    pub fn sysv_attach(id: i32, write: bool) -> ShmRequest {
        Self::new(SHM_SYSV_ATTACH)
            .with(&id.to_ne_bytes())
            .with(&[u8::from(write)])
    }

    /// The message bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

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
        assert_eq!(std::mem::size_of::<AttachReply>(), 168);
    }

    #[test]
    fn sizes_parse_in_one_grammar() {
        for (s, v) in [
            (&b"123"[..], 123u64),
            (b"123B", 123),
            (b"64k", 64 << 10),
            (b"64KiB", 64 << 10),
            (b"256M", 256 << 20),
            (b"256MB", 256 << 20),
            (b"16G", 16 << 30),
            (b"16GB", 16 << 30),
            (b"16gib", 16 << 30),
            (b"2T", 2 << 40),
        ] {
            assert_eq!(parse_size(s), Some(v), "{s:?}");
        }
        for bad in [
            &b""[..],
            b"M",
            b"-1",
            b"+1",
            b"1.5G",
            b"12x",
            b"1GG",
            b"10iB",
            b" 1",
            b"1 G",
            b"99999999999999999999999",
            b"17179869184G",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn backings_round_trip() {
        for b in [
            Backing::Default,
            Backing::Hugetlb,
            Backing::Thp,
            Backing::Shmem,
        ] {
            assert_eq!(Backing::from_raw(b.raw()), Some(b));
            assert_eq!(Backing::from_name(b.name()), Some(b));
        }
        assert_eq!(Backing::from_raw(9), None);
        assert_eq!(Backing::Hugetlb.page_size(), 2 << 20);
    }

    #[test]
    fn shm_requests_encode_their_payload() {
        assert_eq!(ShmRequest::reconcile().bytes(), b"U");
        let r = ShmRequest::sysv_attach(7, true);
        assert_eq!(r.bytes()[0], SHM_SYSV_ATTACH);
        assert_eq!(r.bytes().len(), 6);
        assert_eq!(ShmRequest::sysv_created(1, 2).bytes().len(), 13);
    }
}
