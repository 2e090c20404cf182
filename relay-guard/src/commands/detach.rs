//! `relay-guard detach`: remove the program, its links and every pin under
//! the config's `pin_dir`. Refuses while an agent holds that `pin_dir`.
use std::path::Path;

use anyhow::bail;

use crate::kernel::pins::{AgentLock, Pins};

pub fn execute(config_path: &Path) -> anyhow::Result<()> {
    let pin_dir = super::pin_dir_of(config_path)?;
    if let Some(pid) = AgentLock::holder(&pin_dir) {
        bail!(
            "an agent (pid {pid}) is running with pin_dir `{}`; stop it first, then detach",
            pin_dir.display()
        );
    }
    if !pin_dir.exists() {
        let _ = std::fs::remove_file(crate::kernel::pins::lock_path(&pin_dir));
        println!("nothing pinned at {}: already detached", pin_dir.display());
        return Ok(());
    }
    let pins = Pins::new(&pin_dir);
    let mut links = Vec::new();
    for dir in std::iter::once(pins.state()).chain(pins.other_layouts()) {
        if let Ok(rd) = std::fs::read_dir(dir.join("links")) {
            for e in rd.filter_map(Result::ok) {
                // Removing the last reference to a bpf_link detaches it.
                std::fs::remove_file(e.path())?;
                links.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    std::fs::remove_dir_all(&pin_dir)?;
    // The lock file of this pin_dir too (no agent holds it: checked above).
    let _ = std::fs::remove_file(crate::kernel::pins::lock_path(&pin_dir));
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
