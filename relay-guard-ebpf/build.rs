//! Rebuild the XDP object when bpf-linker changes (aya-template), and keep
//! the dispatcher's slot functions global: bpf-linker internalizes what is
//! not exported, and the kernel replaces (freplace) only global functions.
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let slots: Vec<String> = (0..10).map(|i| format!("prog{i}")).collect();
    for bin in ["xdp-dispatcher", "xdp-dispatcher-frags"] {
        println!("cargo:rustc-link-arg-bin={bin}=--export={}", slots.join(","));
    }
}
