//! The `kn` binary: everything lives in the library; see `kn --help`.

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    kn::cli::main()
}

/// `kn attribute` allocates and frees buffers of up to tens of MB for every batch. glibc
/// gives memory that large back to the kernel at once, which then faults it in again,
/// zeroed, page by page: about a tenth of the run. Keeping it in the heap costs no more
/// peak memory than the run has anyway.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    use std::ffi::c_int;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_MMAP_THRESHOLD: c_int = -3;
    // SAFETY: plain setters of glibc's malloc, called before any thread starts. 32 MiB is
    // the largest mmap threshold glibc accepts on 64-bit systems.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, c_int::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
