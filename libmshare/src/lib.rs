//! libmshare: the msharefs client.
//!
//! - [`client`]: the client core, allocation-free: what a descriptor is, create, attach,
//!   the attach socket. The Rust API, the C ABI and the `LD_PRELOAD` shim all call it.
//! - [`region`]: the Rust API (create, open, attach at a 1 GiB-aligned address, detach).
//! - [`anon`]: anonymous shared memory on a new region (the shim's `MAP_ANONYMOUS` path).
//! - [`guard`]: the `MSHAREFS_UNMAP` guard.
//! - [`uapi`]: the protocol shared with the daemon (the `mshare-uapi` crate).
//! - the C ABI (`mshare_*` functions, header `include/mshare.h`) is built on `region`.

pub mod anon;
pub mod client;
pub mod cstr;
pub mod ffi;
pub mod guard;
pub mod region;

pub use kernel_glue::mapping::Protection;
pub use mshare_uapi as uapi;
pub use mshare_uapi::Backing;
pub use region::{Attachment, Region, set_backing};
