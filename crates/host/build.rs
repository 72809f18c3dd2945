//! Keeps `libtorch_cuda` linked into every binary and test of this crate.
//!
//! The PyPI torch wheel's CUDA kernels register themselves from static
//! initialisers of `libtorch_cuda.so`; nothing references its symbols, so
//! the linker's default `--as-needed` drops it and `tch::Cuda::is_available()`
//! then reports false even on a machine with a GPU. torch-sys passes the
//! libtorch directory on (`links = "tch"` → `DEP_TCH_LIBTORCH_LIB`).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else { return };
    let dir = std::path::PathBuf::from(dir);
    if dir.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
