//! The CUDA half of libtorch stays linked (build.rs), so that a machine
//! with a GPU really uses it. Checked without a GPU: when the torch wheel
//! ships `libtorch_cuda.so`, this test process must have it mapped.

#[test]
fn libtorch_cuda_is_loaded_when_the_wheel_has_it() {
    // Touch libtorch so the process is fully set up.
    let _ = tch::Cuda::is_available();
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    let torch_cpu = maps.lines().find(|l| l.contains("libtorch_cpu.so")).expect("libtorch_cpu.so is not mapped");
    let path = torch_cpu.split_whitespace().last().unwrap();
    let dir = std::path::Path::new(path).parent().unwrap();
    if dir.join("libtorch_cuda.so").exists() {
        assert!(
            maps.contains("libtorch_cuda.so"),
            "{} has libtorch_cuda.so but the process did not load it: the linker dropped it (--as-needed)",
            dir.display()
        );
        eprintln!("libtorch_cuda.so loaded from {}; CUDA available: {}", dir.display(), tch::Cuda::is_available());
    } else {
        eprintln!("{} has no libtorch_cuda.so (a CPU-only libtorch): nothing to check", dir.display());
    }
}
