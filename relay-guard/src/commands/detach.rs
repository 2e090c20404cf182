//! `relay-guard detach`: remove the program, its links and every pin under
//! the config's `pin_dir`. Refuses while an agent holds that `pin_dir`,
//! when it is not a directory of its own on a bpffs, and when it holds
//! anything relay-guard did not create (named in the error); in each case
//! before deleting anything.
use std::path::Path;

use anyhow::bail;

use crate::kernel::pins::{self, AgentLock, Pins};

pub fn execute(config_path: &Path) -> anyhow::Result<()> {
    let text = super::config_text(config_path)?;
    let pin_dir = super::pin_dir_of(&crate::config::ConfigFile::parse(config_path, &text))?;
    if std::fs::symlink_metadata(&pin_dir).is_err() {
        println!("nothing pinned at {}: already detached", pin_dir.display());
        return Ok(());
    }
    let real = pins::check_pin_dir(&pin_dir)?;
    // Held until the end: no agent starts on this pin_dir meanwhile.
    let _lock = AgentLock::lock_existing(&real)?;
    let pins = Pins::new(&real);
    let foreign = pins.foreign_entries();
    if !foreign.is_empty() {
        let names: Vec<String> = foreign.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "pin_dir `{}` holds what relay-guard did not create: {}; nothing was detached (remove those, or fix pin_dir)",
            pin_dir.display(),
            names.join(", ")
        );
    }
    // relay-guard's slot in shared (libxdp) dispatchers goes first, while
    // the pinned maps still tell which slot is ours; the other programs stay.
    let mut links: Vec<String> = crate::kernel::shared::leave_all(&pins)
        .map_err(|e| anyhow::anyhow!("leaving the XDP dispatcher: {e}; nothing else was detached"))?
        .into_iter()
        .map(|i| {
            crate::kernel::loader::ifname(i)
                .map_or_else(|| format!("ifindex {i}"), |n| format!("{n} (dispatcher slot)"))
        })
        .collect();
    let layouts = std::iter::once(pins.state())
        .filter(|p| p.exists())
        .chain(pins.other_layouts());
    for dir in layouts {
        // Removing the last reference to a bpf_link detaches it.
        links.extend(pins::remove_layout(&dir)?);
    }
    std::fs::remove_dir(&real)?;
    println!(
        "detached from {} interface(s){}; removed {}",
        links.len(),
        if links.is_empty() {
            String::new()
        } else {
            format!(" ({})", links.join(", "))
        },
        pin_dir.display()
    );
    Ok(())
}
