//! Keeping every configured interface guarded while devices come and go.
//!
//! [`LinkWatch`] is the event source: the kernel's link notifications
//! (`RTNLGRP_LINK` on a netlink route socket: a device created, deleted,
//! renamed or changed), plus a check every few seconds for what sends no
//! notification (a link pin deleted under the agent, a lost notification).
//! The messages are not parsed: any of them means "look again", and
//! [`guard_one`] is cheap and changes nothing that is right (one
//! `if_nametoindex` and one `bpf_link_get_info` per interface).
//!
//! A pinned link is named after the device it guards. [`guard_one`] makes
//! the link of `name` guard the device now called `name`:
//! - a link whose device is gone (the kernel reports ifindex 0) is unpinned
//!   and the device of that name, when there is one, is attached anew;
//! - a live link on the device called `name` is left alone (at start it is
//!   adopted: the new program swapped in atomically, see `kernel::loader`);
//! - a live link on a device that was renamed to `other` moves to `other`'s
//!   pin when `other` is configured, and is otherwise unpinned (detached from
//!   a device the config does not name, as at start-up);
//! - a configured name with no device is reported, and attached when it
//!   appears.
use std::{collections::HashMap, io, os::fd::OwnedFd, time::Duration};

use nix::sys::socket::{AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket};
use tokio::{io::unix::AsyncFd, time::Interval};
use tracing::{info, warn};

use crate::{
    config::XdpMode,
    error::LoadError,
    kernel::{
        loader::{self, Loaded},
        netdev::{self, LinkState},
        pins::Pins,
    },
};

/// With link notifications: how often to check anyway.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Without them (no netlink socket): how often to poll, so a re-created
/// device is guarded again well within a second.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// Link notifications and a periodic check.
pub struct LinkWatch {
    socket: Option<AsyncFd<OwnedFd>>,
    tick: Interval,
    buf: Vec<u8>,
}

impl LinkWatch {
    /// Subscribes to link notifications; without them (a kernel or sandbox
    /// that refuses the socket), polls every 250 ms, with a log line saying so.
    pub fn start() -> LinkWatch {
        let socket = match subscribe() {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!(error = %e, "no netlink link notifications; checking the interfaces every 250 ms instead");
                None
            }
        };
        let every = if socket.is_some() { CHECK_EVERY } else { POLL_EVERY };
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        LinkWatch {
            socket,
            tick,
            buf: vec![0; 32 * 1024],
        }
    }

    /// Waits until a link changed (or the periodic check is due), then
    /// drains the pending notifications. Cancel-safe.
    pub async fn changed(&mut self) {
        let Some(socket) = &self.socket else {
            self.tick.tick().await;
            return;
        };
        tokio::select! {
            _ = self.tick.tick() => {}
            ready = socket.readable() => {
                let Ok(mut guard) = ready else { return };
                // Bounded: a burst (a device created sends several) is
                // drained; what arrives later wakes the next call.
                for _ in 0..256 {
                    match guard.try_io(|fd| recv(std::os::fd::AsRawFd::as_raw_fd(fd.get_ref()), &mut self.buf, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)) {
                        Ok(Ok(_)) => {}
                        // ENOBUFS (notifications were lost) or another
                        // error: look at every interface anyway.
                        Ok(Err(_)) | Err(_) => break,
                    }
                }
            }
        }
    }
}

/// A netlink route socket subscribed to `RTNLGRP_LINK`.
fn subscribe() -> io::Result<AsyncFd<OwnedFd>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &NetlinkAddr::new(0, libc::RTMGRP_LINK as u32),
    )?;
    // SAFETY: the AsyncFd owns the socket, so the fd stays open for as long
    // as it is registered.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// What [`guard_one`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The device called `name` carries the filter. `changed`: attached,
    /// adopted or moved now (labels and counter slots to refresh).
    Guarded { ifindex: u32, changed: bool },
    /// No device is called `name` (yet).
    Missing,
}

/// Makes the device called `name` carry the filter (see the module comment).
/// `labels` (ifindex → name, for the counters) follows. `adopt`: also update
/// a live link that is right to this program (at start-up).
pub fn guard_one(
    loaded: &mut Loaded,
    pins: &Pins,
    name: &str,
    mode: XdpMode,
    configured: &[String],
    labels: &mut HashMap<u32, String>,
    adopt: bool,
) -> Result<Outcome, LoadError> {
    let now = loader::ifindex(name).ok();
    let pin = pins.link(name);
    match netdev::pinned_link_state(&pin) {
        LinkState::Live { ifindex } if Some(ifindex) == now => {
            if !adopt {
                labels.insert(ifindex, name.to_string());
                return Ok(Outcome::Guarded {
                    ifindex,
                    changed: false,
                });
            }
        }
        LinkState::Live { ifindex: theirs } => moved_away(pins, name, theirs, configured, labels),
        LinkState::Dead => {
            info!(interface = name, pin = %pin.display(), "the device of the pinned link is gone: unpinning the dead link");
            let _ = std::fs::remove_file(&pin);
        }
        LinkState::Absent | LinkState::Unknown(_) => {}
    }
    let Some(ifindex) = now else {
        return Ok(Outcome::Missing);
    };
    // In a shared (libxdp) dispatcher there is no link of ours to pin: the
    // slot is found in the dispatcher (and replaced only at start-up).
    if !adopt && loaded.in_dispatcher(ifindex) {
        labels.insert(ifindex, name.to_string());
        return Ok(Outcome::Guarded {
            ifindex,
            changed: false,
        });
    }
    netdev::check_ethernet(name)?;
    // A device created again under this name counts on in the name's slot.
    let olds: Vec<u32> = labels
        .iter()
        .filter(|&(&i, n)| n == name && i != ifindex)
        .map(|(&i, _)| i)
        .collect();
    for old in olds {
        if loader::ifname(old).is_none() {
            labels.remove(&old);
            if let Err(e) = loaded.maps.move_iface_slot(old, ifindex) {
                warn!(interface = name, error = %e, "could not keep the counter slot of the previous device");
            }
        }
    }
    let a = loaded.attach(name, mode)?;
    labels.insert(a.ifindex, name.to_string());
    Ok(Outcome::Guarded {
        ifindex: a.ifindex,
        changed: true,
    })
}

/// The link pinned for `name` is live on device `theirs`, which is no longer
/// called `name` (renamed, or moved to another namespace).
/// Its counters keep the label they were counted under.
fn moved_away(pins: &Pins, name: &str, theirs: u32, configured: &[String], labels: &mut HashMap<u32, String>) {
    let pin = pins.link(name);
    let other = loader::ifname(theirs);
    if let Some(other) = other.as_deref().filter(|o| configured.iter().any(|c| c == o)) {
        let to = pins.link(other);
        let free = match netdev::pinned_link_state(&to) {
            LinkState::Absent => true,
            LinkState::Dead => std::fs::remove_file(&to).is_ok(),
            _ => false,
        };
        if free && std::fs::rename(&pin, &to).is_ok() {
            info!(
                interface = name,
                now = other,
                "interface renamed: its pinned link now stands for `{other}`"
            );
            labels.insert(theirs, other.to_string());
            return;
        }
    }
    warn!(
        interface = name,
        now = other.as_deref().unwrap_or("(not in this namespace)"),
        "the device this filter was attached to is no longer called `{name}`: detaching from it; `{name}` is guarded when a device of that name exists"
    );
    let _ = std::fs::remove_file(&pin);
}
