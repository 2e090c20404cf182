//! The OS error the kernel returned, wherever it sits in an error's source
//! chain (aya wraps the syscall's `io::Error` one or two levels down): the
//! one walk of a chain that the loader, the dispatcher sharing and the
//! agent's permission hint all ask.
use std::error::Error;

/// Whether `e` or an error in its source chain is the OS error `errno`.
pub fn in_chain(e: &(dyn Error + 'static), errno: i32) -> bool {
    chain(e).any(|err| {
        err.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            == Some(errno)
    })
}

/// Whether the kernel refused for want of privilege somewhere down the
/// chain: `EPERM` or `EACCES`, or, for an error that kept only the kernel's
/// text, a message that says so.
pub fn denied(e: &(dyn Error + 'static)) -> bool {
    chain(e).any(|err| {
        err.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
            || err.to_string().contains("Operation not permitted")
            || err.to_string().contains("Permission denied")
    })
}

/// `e`, then each of its sources.
fn chain<'a>(e: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(e), |&err| err.source())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("loading `x`")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_errno_is_found_down_the_chain() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::ENOLINK));
        assert!(in_chain(&e, libc::ENOLINK));
        assert!(!in_chain(&e, libc::EPERM));
        assert!(!denied(&e));
        assert!(denied(&Outer(std::io::Error::from_raw_os_error(libc::EACCES))));
        assert!(denied(&std::io::Error::other(
            "bpf: Operation not permitted (os error 1)"
        )));
    }
}
