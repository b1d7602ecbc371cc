//! libmshare: the msharefs client.
//!
//! - [`uapi`]: the mshare ioctl numbers and layouts (kernel v3 plus msharefs extensions),
//!   shared with the daemon;
//! - [`region`]: the Rust API (create, open, attach at a 1 GiB-aligned address, detach);
//! - the C ABI (`mshare_*` functions, header `include/mshare.h`) is built on `region`.

pub mod anon;
pub mod cstr;
pub mod ffi;
pub mod guard;
pub mod interpose;
pub mod region;
pub mod uapi;

pub use kernel_glue::mapping::Protection;
pub use region::{Attachment, Backing, Region, set_backing};
