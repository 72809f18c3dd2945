//! One module per subcommand.

/// `println!` for a subcommand's report: when stdout is closed early
/// (`tern-device bench B | head`), the process ends quietly with status 0,
/// as Unix tools do, instead of panicking on the broken pipe; any other
/// write error ends it with status 1 and the error on stderr.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cmd::write_line(format_args!($($arg)*))
    };
}

/// One line on stdout, flushed (see [`outln!`]).
pub fn write_line(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let r = out.write_fmt(args).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}

use std::path::{Path, PathBuf};

use anyhow::Context;
use tern_device::trust::Trust;

pub mod bench;
pub mod cameras;
pub mod capture_args;
pub mod classify;
pub mod eval;
pub mod http;
pub mod info;
pub mod netcam;
pub mod review;
pub mod run;
pub mod run_extras;
pub mod selftest;

/// How a subcommand loads its bundle: the options every one of them shares.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    /// Compute in half floats (tract's f32_to_f16 transform): for ARM cores
    /// with FP16 arithmetic (Raspberry Pi 5, Jetson Orin); emulated and slow
    /// on x86-64. Float bundles and int8-weights bundles only.
    #[arg(long)]
    f16: bool,
    /// Threads for the plan's kernels (1: the calling thread only).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Run tract's own kernels only, without Tern's fused convolution ops
    /// (1×1, full and depthwise): to measure one against the other.
    #[arg(long)]
    tract_kernels: bool,
    /// Memory the graph's tensors may need, MiB, as estimated before tract
    /// reads the graph; a bundle over it is refused.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    memory_budget_mib: u64,
    /// Run a QDQ int8 bundle's convolutions with Tern's integer ops
    /// (experimental: exact, but not yet faster than tract's handling of
    /// the same file; see docs/performance.md).
    #[arg(long, conflicts_with = "tract_kernels")]
    int8_ops: bool,
    /// Which bundles may run.
    #[command(flatten)]
    pub trust: TrustArgs,
}

/// `--trust`: the public keys whose bundles may run.
#[derive(clap::Args, Debug, Clone)]
pub struct TrustArgs {
    /// Run only bundles signed by this key (a `tern-host keygen` KEY.pub)
    /// and unchanged since; unsigned, tampered and otherwise signed bundles
    /// are refused, on hot reload too. Repeat it to trust several keys
    /// (key rotation). Without it: the keys in $TERN_TRUST (paths separated
    /// by `:`), if set.
    #[arg(long = "trust", value_name = "KEY.pub")]
    keys: Vec<PathBuf>,
}

impl TrustArgs {
    /// The trusted keys, read from their files: those of `--trust`, else
    /// those of `TERN_TRUST` (empty entries skipped, so an empty or unset
    /// variable trusts no key: any bundle runs).
    pub fn trust(&self) -> anyhow::Result<Trust> {
        if !self.keys.is_empty() {
            return Trust::read(&self.keys);
        }
        let from_env: Vec<PathBuf> = std::env::var_os("TERN_TRUST")
            .map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect())
            .unwrap_or_default();
        Trust::read(&from_env).context("in TERN_TRUST")
    }
}

impl EngineArgs {
    /// Reads the trusted keys, then loads and checks the bundle at `path`.
    pub fn load(&self, path: &Path) -> anyhow::Result<tern_device::Classifier> {
        let (classifier, _) = self.trust.trust()?.load(path, &self.options())?;
        Ok(classifier)
    }

    /// The engine's load options.
    pub fn options(&self) -> tern_device::engine::LoadOptions {
        use tern_device::engine::{Compute, Kernels, LoadOptions};
        LoadOptions {
            compute: if self.f16 { Compute::F16 } else { Compute::F32 },
            kernels: if self.tract_kernels { Kernels::Tract } else { Kernels::Tern },
            threads: usize::from(self.threads),
            memory_budget: self.memory_budget_mib << 20,
            int8_ops: self.int8_ops,
        }
    }
}
