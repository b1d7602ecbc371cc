//! Decoding and encoding of ioctl payloads, with length checks: a client's bytes are
//! never trusted to have the right size.

use mshare_uapi::{MshareCreate, MshareRegionInfo, MshareUnmap};

use crate::fs::FsResult;
use kernel_glue::errnos::EINVAL;

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(a)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_ne_bytes(a)
}

/// Parses `struct mshare_create` (40 bytes).
pub fn parse_create(b: &[u8]) -> FsResult<MshareCreate> {
    if b.len() != std::mem::size_of::<MshareCreate>() {
        return Err(EINVAL);
    }
    Ok(MshareCreate {
        region_offset: u64_at(b, 0),
        size: u64_at(b, 8),
        offset: u64_at(b, 16),
        prot: u32_at(b, 24),
        flags: u32_at(b, 28),
        fd: u32_at(b, 32),
        _pad: 0,
    })
}

/// Parses `struct mshare_unmap` (16 bytes).
pub fn parse_unmap(b: &[u8]) -> FsResult<MshareUnmap> {
    if b.len() != std::mem::size_of::<MshareUnmap>() {
        return Err(EINVAL);
    }
    Ok(MshareUnmap {
        region_offset: u64_at(b, 0),
        size: u64_at(b, 8),
    })
}

/// Encodes `struct mshare_region_info` in the C layout.
pub fn info_bytes(i: &MshareRegionInfo) -> Vec<u8> {
    let mut v = Vec::with_capacity(std::mem::size_of::<MshareRegionInfo>());
    v.extend_from_slice(&i.size.to_ne_bytes());
    v.extend_from_slice(&i.page_size.to_ne_bytes());
    v.extend_from_slice(&i.granule.to_ne_bytes());
    v.extend_from_slice(&i.backing.to_ne_bytes());
    v.extend_from_slice(&i.version.to_ne_bytes());
    v.extend_from_slice(&i.length.to_ne_bytes());
    v.extend_from_slice(&i.kind.to_ne_bytes());
    v.extend_from_slice(&i.flags.to_ne_bytes());
    v.extend_from_slice(&i.socket_path);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_lengths_are_einval() {
        assert_eq!(parse_create(&[0u8; 39]), Err(EINVAL));
        assert_eq!(parse_create(&[0u8; 41]), Err(EINVAL));
        assert_eq!(parse_unmap(&[]), Err(EINVAL));
        let mut b = vec![0u8; 40];
        b[0] = 1;
        b[28] = 3;
        let c = parse_create(&b).unwrap();
        assert_eq!(c.region_offset, 1);
        assert_eq!(c.flags, 3);
        assert_eq!(info_bytes(&MshareRegionInfo::default()).len(), 160);
    }
}
