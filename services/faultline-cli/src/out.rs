//! Writing to stdout without panicking when the reader goes away
//! (`faultline observe | head`): [`outln!`] and [`out!`] return the write
//! error, and [`closed`] tells `main` to exit 0 quietly on it, as grep and
//! kubectl do.

/// `println!` that returns its error from the enclosing function.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)?
    }};
}

/// `print!` that returns its error from the enclosing function.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($arg)*)?
    }};
}

pub(crate) use {out, outln};

/// Whether `e` is stdout's reader having gone away.
pub fn closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}
