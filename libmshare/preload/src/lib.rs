//! LD_PRELOAD shim (see issue "libmshare").
