//! Builds relay-guard-ebpf for bpfel-unknown-none (nightly, -Z build-std=core,
//! bpf-linker) and leaves the object in OUT_DIR, where `src/lib.rs` embeds it:
//! the agent is one file to deploy.
//!
//! `AYA_BUILD_SKIP=1` (for `cargo check`/clippy without bpf-linker) embeds an
//! empty object instead; such a binary refuses to load and says why.
use std::{env, fs, path::PathBuf};

use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out_dir.join("relay-guard");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(&object, [])?;
        fs::write(out_dir.join("xdp-dispatcher"), [])?;
        fs::write(out_dir.join("xdp-dispatcher-frags"), [])?;
        println!("cargo:warning=AYA_BUILD_SKIP set: embedding an empty eBPF object");
        return Ok(());
    }
    if which_bpf_linker().is_none() {
        anyhow::bail!(
            "bpf-linker not found on PATH: run `cargo xtask build-ebpf`, which installs it \
             (or set AYA_BUILD_SKIP=1 to check the code without building the XDP program)"
        );
    }
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest.join("..").join("relay-guard-ebpf");
    let ebpf_dir = ebpf_dir.to_str().expect("UTF-8 path");
    aya_build::build_ebpf(
        [Package {
            name: "relay-guard-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )?;
    println!(
        "cargo:rerun-if-changed={}",
        manifest.join("../relay-guard-common/src").display()
    );
    Ok(())
}

fn which_bpf_linker() -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}
