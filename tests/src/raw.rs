//! Raw frames onto a veth: AF_PACKET sockets made inside a namespace, for
//! tests that write crafted frames straight onto the client end of a lab
//! (no client IP stack in the way) or capture what XDP passed.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::netns::NetNs;

/// `ETH_P_ALL`: every protocol, for a capture socket.
pub const ETH_P_ALL: u16 = 0x0003;

/// An AF_PACKET raw socket made inside `ns` and bound to `interface` there.
/// `protocol` 0 receives nothing (a sender); `ETH_P_ALL` captures.
pub fn packet_socket(ns: &NetNs, interface: &str, protocol: u16) -> (OwnedFd, i32) {
    let interface = interface.to_string();
    ns.run(move || {
        let ifindex = relay_guard::kernel::loader::ifindex(&interface).unwrap_or_else(|e| panic!("{interface}: {e}"));
        let ifindex = i32::try_from(ifindex).expect("ifindex fits");
        // SAFETY: plain socket(2) call; the fd is owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(protocol.to_be()),
            )
        };
        assert!(fd >= 0, "socket(AF_PACKET): {}", std::io::Error::last_os_error());
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let sll = sockaddr_ll(ifindex, protocol, None);
        // SAFETY: sll is a valid sockaddr_ll and its size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                socklen(size_of::<libc::sockaddr_ll>()),
            )
        };
        assert!(
            rc == 0,
            "bind AF_PACKET to {interface}: {}",
            std::io::Error::last_os_error()
        );
        (fd, ifindex)
    })
}

pub fn socklen(n: usize) -> libc::socklen_t {
    libc::socklen_t::try_from(n).expect("small")
}

pub fn sockaddr_ll(ifindex: i32, protocol: u16, dst: Option<[u8; 6]>) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = u16::try_from(libc::AF_PACKET).expect("small");
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex;
    if let Some(mac) = dst {
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&mac);
    }
    sll
}

pub fn send_frame(fd: &OwnedFd, ifindex: i32, frame: &[u8]) {
    let sll = sockaddr_ll(
        ifindex,
        0,
        Some(frame[..6].try_into().expect("frame has a destination MAC")),
    );
    // SAFETY: frame and sll are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const sll).cast(),
            socklen(size_of::<libc::sockaddr_ll>()),
        )
    };
    assert!(
        usize::try_from(n).ok() == Some(frame.len()),
        "sendto AF_PACKET ({} bytes): {}",
        frame.len(),
        std::io::Error::last_os_error()
    );
}
