//! How Faultline's binaries end: `main` returns [`exit_status`] of what it
//! ran. An error is one line on stderr, `NAME: what failed: why`, each
//! cause once, whatever RUST_BACKTRACE says: it is for the operator, not a
//! report of a bug (a panic still prints its backtrace).

use std::process::ExitCode;

/// The exit status for `result` of the binary called `name`, printing an
/// error as [`one_line`] on stderr.
pub fn exit_status(name: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", one_line(name, &e));
            ExitCode::FAILURE
        }
    }
}

/// `error` and its causes on one line after `name`, a cause left out when
/// the message before it already ends with it (an error type that prints
/// its source as well as returning it).
pub fn one_line(name: &str, error: &anyhow::Error) -> String {
    let mut line = name.to_string();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Both(std::io::Error);

    impl std::fmt::Display for Both {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot read x: {}", self.0)
        }
    }

    impl std::error::Error for Both {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn causes_follow_on_one_line_each_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(io()).context("loading configuration");
        assert_eq!(one_line("daemon", &e), "daemon: loading configuration: entity not found");
        // A source the message already printed is not printed again.
        let e = anyhow::Error::new(Both(io())).context("starting");
        assert_eq!(one_line("daemon", &e), "daemon: starting: cannot read x: entity not found");
        assert_eq!(exit_status("daemon", Ok(())), ExitCode::SUCCESS);
    }
}
