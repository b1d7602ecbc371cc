//! Anonymous shared memory on msharefs.
//!
//! With `MSHARE_MOUNT=DIR` (a directory on an msharefs mount with huge pages) and
//! `MSHARE_ANON_MIN=BYTES` in the environment, `mmap(NULL, len, PROT_READ|PROT_WRITE,
//! MAP_SHARED|MAP_ANONYMOUS, ...)` with `len >= MSHARE_ANON_MIN` is answered with a new
//! hugetlb region of that mount (`mshare::anon`), mapped at a 1 GiB-aligned address and
//! unlinked at once, or kept under the name `MSHARE_ANON_NAME` when that is set. When the
//! region cannot be had, the call goes to the kernel unchanged and one line on standard
//! error says why. The mapping is recorded in [`crate::placed`], so the program's own
//! `munmap(addr, len)` removes all of it.

use std::ffi::CStr;

use kernel_glue::shim_sys;
use mshare::anon::AnonError;

use crate::env::{self, ENV_ANON_NAME, PATH_MAX};
use crate::log::{Bytes, errno_name, log};
use crate::placed;

/// Places an anonymous shared mapping of `len` bytes on a new region of `MSHARE_MOUNT`.
/// Returns its address, or `None` (after logging one line) when the caller should let
/// the kernel map ordinary shared memory instead.
pub fn place(len: usize, populate: bool) -> Option<usize> {
    let mut dir_buf = [0u8; PATH_MAX];
    // Unset since the settings were read: placement is off now.
    let dir = env::mount_dir(&mut dir_buf)?;
    let mut name_buf = [0u8; 256];
    let name = shim_sys::getenv(ENV_ANON_NAME, &mut name_buf).filter(|n| !n.is_empty());
    match mshare::anon::create_anon_region(dir, name, len) {
        Ok(mapping) => {
            if populate {
                // mmap(2) ignores MAP_POPULATE failures too: pages fault in later instead.
                let _ = mapping.populate(0, mapping.len() as u64);
            }
            let (addr, mapped) = mapping.into_raw();
            if !placed::register(addr, len, addr + mapped) {
                log(format_args!(
                    "more than {} regions placed; munmap of {addr:#x} must use a length \
                     rounded up to 2 MiB",
                    placed::SLOTS
                ));
            }
            Some(addr)
        }
        Err(e) => {
            log_fallback(len, dir, &e);
            None
        }
    }
}

fn log_fallback(len: usize, dir: &CStr, e: &AnonError) {
    let errno = e.errno();
    log(format_args!(
        "a {len}-byte MAP_SHARED|MAP_ANONYMOUS mapping stays ordinary shared memory: \
         {} in {:?} failed: errno {errno} ({})",
        e.step(),
        Bytes(dir.to_bytes()),
        errno_name(errno)
    ));
}
