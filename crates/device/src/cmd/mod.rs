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

pub mod bench;
pub mod cameras;
pub mod classify;
pub mod eval;
pub mod info;
pub mod run;
