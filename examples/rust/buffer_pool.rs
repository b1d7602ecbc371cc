//! A buffer pool shared by worker processes, the way a database uses msharefs.
//!
//! ```text
//! buffer-pool MOUNT/NAME SIZE_MIB WORKERS
//! ```
//!
//! The parent creates the region (hugetlb unless the mount defaults otherwise) and starts
//! WORKERS processes (this program again, with `--worker`). Each worker opens the region,
//! attaches it (1 GiB-aligned, so hugetlb page tables are shared), and stamps its own
//! slice of 2 MiB "buffers" with a header word and a checksum. The parent then attaches
//! read-only, verifies every slice, removes the region and reports. Exit code 0 only when
//! every buffer checks out.
//!
//! Shared memory is touched only through raw pointers and volatile accesses: other
//! processes write it concurrently, so no Rust reference may point into it.

use std::path::Path;
use std::process::{Command, ExitCode};

use mshare::{Backing, Protection, Region};

const BUFFER: u64 = 2 << 20;

fn word(worker: u64, buffer: u64) -> u64 {
    (worker << 48) ^ buffer.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn slice_of(worker: u64, workers: u64, buffers: u64) -> std::ops::Range<u64> {
    let per = buffers / workers;
    worker * per..(worker + 1) * per
}

fn worker(path: &Path, worker: u64, workers: u64) -> Result<(), String> {
    let region =
        Region::open(path, kernel_glue::consts::O_RDWR).map_err(|e| format!("open: {e}"))?;
    let att = region
        .attach(Protection::ReadWrite)
        .map_err(|e| format!("attach: {e}"))?;
    let m = att.mapping();
    let buffers = region.size() / BUFFER;
    for b in slice_of(worker, workers, buffers) {
        let base = b * BUFFER;
        m.store_u64(base, word(worker, b))
            .map_err(|e| e.to_string())?;
        m.store_u64(base + BUFFER - 8, !word(worker, b))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn parent(path: &Path, size_mib: u64, workers: u64) -> Result<(), String> {
    let size = size_mib << 20;
    let region = Region::create(path, size, 0o600, Backing::Default)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let children: Vec<_> = (0..workers)
        .map(|w| {
            Command::new(&exe)
                .arg("--worker")
                .arg(path)
                .arg(w.to_string())
                .arg(workers.to_string())
                .spawn()
        })
        .collect::<Result<_, _>>()
        .map_err(|e| format!("spawn: {e}"))?;
    for mut c in children {
        let st = c.wait().map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("a worker failed: {st}"));
        }
    }
    let att = region
        .attach(Protection::ReadOnly)
        .map_err(|e| format!("attach: {e}"))?;
    let m = att.mapping();
    let buffers = size / BUFFER;
    let mut bad = 0;
    for w in 0..workers {
        for b in slice_of(w, workers, buffers) {
            let base = b * BUFFER;
            let ok = m.load_u64(base).ok() == Some(word(w, b))
                && m.load_u64(base + BUFFER - 8).ok() == Some(!word(w, b));
            bad += u64::from(!ok);
        }
    }
    drop(att);
    std::fs::remove_file(path).map_err(|e| format!("unlink: {e}"))?;
    println!(
        "buffer-pool: {workers} workers stamped {} buffers of 2 MiB on a {:?} region; {bad} bad",
        buffers / workers * workers,
        region.backing()
    );
    if bad == 0 {
        Ok(())
    } else {
        Err(format!("{bad} buffers did not verify"))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.as_slice() {
        [flag, path, w, n] if flag == "--worker" => match (w.parse(), n.parse()) {
            (Ok(w), Ok(n)) => worker(Path::new(path), w, n),
            _ => Err("bad worker arguments".into()),
        },
        [path, size, workers] => match (size.parse::<u64>(), workers.parse::<u64>()) {
            (Ok(s), Ok(n)) if s > 0 && n > 0 => parent(Path::new(path), s, n),
            _ => Err("SIZE_MIB and WORKERS must be positive numbers".into()),
        },
        _ => Err("usage: buffer-pool MOUNT/NAME SIZE_MIB WORKERS".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("buffer-pool: {e}");
            ExitCode::FAILURE
        }
    }
}
