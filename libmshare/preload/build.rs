//! Link the shim so that it exports only the functions it interposes (exports.map).
//!
//! rustc exports every `#[no_mangle]` function of every crate a cdylib links, so the shim
//! would also export libmshare's C ABI (`mshare_*`), and a program linked with `-lmshare`
//! and run under the shim would get the shim's copies. rustc writes its own version
//! script, which the GNU linker uses in place of a second one, so ours cannot simply be
//! added; `--exclude-libs=ALL` hides every symbol that comes from a linked library
//! (libmshare, kernel-glue, std are rlib archives), which leaves the shim crate's own
//! functions. tests/packaging.rs checks the result against exports.map, which the
//! installed library (`make install`) uses as its version script.

fn main() {
    println!("cargo:rerun-if-changed=exports.map");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-cdylib-link-arg=-Wl,--exclude-libs=ALL");
}
