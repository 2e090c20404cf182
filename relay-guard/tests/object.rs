//! The embedded XDP object against the names userspace uses for it: `#[map]`
//! in the eBPF crate needs literals, so nothing else ties them to
//! `relay_guard_common::maps`.
use object::{Object as _, ObjectSymbol as _};

#[test]
fn every_map_name_and_the_program_are_in_the_built_object() {
    let bytes = relay_guard::EBPF_OBJECT;
    if bytes.is_empty() {
        // `AYA_BUILD_SKIP=1` embeds an empty object on purpose (check, clippy).
        assert!(
            std::env::var_os("AYA_BUILD_SKIP").is_some(),
            "the agent embeds no XDP object, and AYA_BUILD_SKIP is not set"
        );
        return;
    }
    let file = object::File::parse(bytes).expect("the embedded XDP object is ELF");
    let symbols: Vec<&str> = file.symbols().filter_map(|s| s.name().ok()).collect();
    for name in relay_guard_common::maps::ALL.iter().chain([&relay_guard::PROGRAM_NAME]) {
        assert!(
            symbols.contains(name),
            "`{name}` is not a symbol of the built XDP object; symbols: {symbols:?}"
        );
    }
    // The check can fail: a name the object does not have is not found.
    assert!(!symbols.contains(&"RG_NO_SUCH_MAP"));
}
