//! `cargo xtask image`: the OCI image the Kubernetes DaemonSet runs, built
//! without docker or podman.
//!
//! One layer on an empty base: the agent as a static (musl) binary at
//! `/usr/bin/relay-guard`, the example config at
//! `/etc/relay-guard/relay-guard.toml`, and empty directories for the
//! DaemonSet's mounts. No shell, no libc, nothing else.
//!
//! Reproducible: every entry has the same owner (0:0) and mtime
//! (`SOURCE_DATE_EPOCH`, else the commit time of HEAD), entries are in a
//! fixed order, the gzip header carries no time or name, and the JSON is
//! written with sorted keys; the same binary gives the same digest.
//!
//! Output: an OCI image layout directory (`oci-layout`, `index.json`,
//! `blobs/sha256/…`), tagged with the package version, which
//! `skopeo copy oci:DIR:VERSION docker://REGISTRY/relay-guard:VERSION` (or
//! `crane push`, `oras`) pushes; with `--docker-archive FILE` also a
//! `docker load`-able tar.
use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::{toolchain, utils::workspace_root};

pub const TARGET: &str = "x86_64-unknown-linux-musl";

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// The OCI layout directory to write (replaced).
    #[arg(long, default_value = "target/oci/relay-guard")]
    pub out: PathBuf,
    /// Also write a `docker load`-able tar here.
    #[arg(long)]
    pub docker_archive: Option<PathBuf>,
    /// Use this static binary instead of building one (it must be static).
    #[arg(long)]
    pub binary: Option<PathBuf>,
}

/// A blob: its bytes' digest and size.
struct Blob {
    digest: String,
    size: usize,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn write_blob(dir: &Path, bytes: &[u8]) -> anyhow::Result<Blob> {
    let digest = sha256(bytes);
    let hex = digest.trim_start_matches("sha256:");
    let path = dir.join("blobs/sha256").join(hex);
    std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))?;
    Ok(Blob {
        digest,
        size: bytes.len(),
    })
}

/// JSON with sorted keys (serde_json's `Value` maps are BTreeMaps).
fn json_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON serialises")
}

fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .current_dir(workspace_root())
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The time every entry and the image config carry.
fn source_date_epoch() -> anyhow::Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number"));
    }
    Ok(git(&["log", "-1", "--format=%ct"])
        .and_then(|t| t.parse().ok())
        .unwrap_or(0))
}

/// RFC 3339 of a Unix time (UTC), for `created`.
fn rfc3339(t: u64) -> String {
    let (days, secs) = (t / 86_400, t % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Builds the static agent (musl), adding the Rust target when missing.
fn build_static() -> anyhow::Result<PathBuf> {
    toolchain::ensure()?;
    let installed = std::process::Command::new("rustup")
        .args(["target", "list", "--installed"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .context("run rustup")?;
    if !String::from_utf8_lossy(&installed.stdout).lines().any(|l| l == TARGET) {
        println!("xtask: installing the Rust target {TARGET} (rustup target add)");
        toolchain::run(toolchain::cmd("rustup").args(["target", "add", TARGET]))?;
    }
    // ring (rustls, for `relaytest`'s STARTTLS) compiles C and assembly: for
    // musl that needs musl's gcc wrapper (Debian: musl-tools).
    toolchain::ensure_debian_tools(&[("musl-gcc", "musl-tools")])?;
    toolchain::run(
        toolchain::cmd("cargo")
            .args([
                "build",
                "--release",
                "--package",
                "relay-guard",
                "--bin",
                "relay-guard",
                "--target",
                TARGET,
            ])
            .env("CC_x86_64_unknown_linux_musl", "musl-gcc"),
    )
    .context("building the static agent")?;
    Ok(workspace_root().join("target").join(TARGET).join("release/relay-guard"))
}

/// Refuses a dynamically linked binary (it would not run on an empty base).
fn check_static(bin: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(bin).with_context(|| format!("read {}", bin.display()))?;
    if bytes.get(..4) != Some(b"\x7fELF") {
        bail!("{} is not an ELF executable", bin.display());
    }
    // A dynamically linked ELF names its interpreter (PT_INTERP).
    if bytes.windows(14).any(|w| w == b"/lib64/ld-linu") || bytes.windows(11).any(|w| w == b"/lib/ld-lin") {
        bail!(
            "{} is dynamically linked; the image has no libc (build it for {TARGET})",
            bin.display()
        );
    }
    Ok(())
}

/// The layer: a tar of fixed order, owner and mtime, gzipped without a
/// timestamp. Returns (uncompressed, compressed).
fn layer(bin: &[u8], config: &[u8], mtime: u64) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    let dir = |tar: &mut tar::Builder<Vec<u8>>, path: &str| -> anyhow::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h.set_size(0);
        tar.append_data(&mut h, path, std::io::empty())?;
        Ok(())
    };
    let file = |tar: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]| -> anyhow::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, path, data)?;
        Ok(())
    };
    // Sorted; the empty directories are the DaemonSet's mount points (and
    // /proc, /sys, /dev, /tmp for the runtime) in a read-only root.
    for d in [
        "dev/",
        "etc/",
        "etc/relay-guard/",
        "proc/",
        "run/",
        "run/relay-guard/",
        "sys/",
        "tmp/",
        "usr/",
        "usr/bin/",
        "var/",
        "var/lib/",
        "var/lib/relay-guard/",
    ] {
        dir(&mut tar, d)?;
        if d == "etc/relay-guard/" {
            file(&mut tar, "etc/relay-guard/relay-guard.toml", 0o644, config)?;
        }
        if d == "usr/bin/" {
            file(&mut tar, "usr/bin/relay-guard", 0o755, bin)?;
        }
    }
    let raw = tar.into_inner()?;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(&raw)?;
    Ok((raw, gz.finish()?))
}

/// The Cargo package's metadata the labels need.
fn package() -> anyhow::Result<(String, String, String, String)> {
    let out = toolchain::cmd("cargo")
        .current_dir(workspace_root())
        .args(["metadata", "--no-deps", "--format-version=1"])
        .output()
        .context("cargo metadata")?;
    let meta: Value = serde_json::from_slice(&out.stdout).context("parse cargo metadata")?;
    let pkg = meta["packages"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "relay-guard"))
        .context("no relay-guard package in cargo metadata")?;
    let s = |k: &str| pkg[k].as_str().unwrap_or_default().to_string();
    Ok((s("version"), s("repository"), s("license"), s("description")))
}

pub fn image(opts: &Options) -> anyhow::Result<()> {
    let bin_path = match &opts.binary {
        Some(b) => b.clone(),
        None => build_static()?,
    };
    check_static(&bin_path)?;
    let root = workspace_root();
    let bin = std::fs::read(&bin_path).with_context(|| format!("read {}", bin_path.display()))?;
    let config_toml = std::fs::read(root.join("deploy/relay-guard.example.toml")).context("read the example config")?;
    let epoch = source_date_epoch()?;
    let created = rfc3339(epoch);
    let (version, source, license, description) = package()?;
    if source.is_empty() {
        bail!("relay-guard/Cargo.toml has no `repository`, which the image's source label needs");
    }
    let revision = git(&["rev-parse", "HEAD"]).unwrap_or_default();

    let out = if opts.out.is_absolute() {
        opts.out.clone()
    } else {
        root.join(&opts.out)
    };
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("remove {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("blobs/sha256")).with_context(|| format!("create {}", out.display()))?;

    let (raw, gz) = layer(&bin, &config_toml, epoch)?;
    let diff_id = sha256(&raw);
    let layer_blob = write_blob(&out, &gz)?;

    let mut labels = BTreeMap::new();
    labels.insert("org.opencontainers.image.title", "relay-guard".to_string());
    labels.insert("org.opencontainers.image.description", description);
    labels.insert("org.opencontainers.image.version", version.clone());
    labels.insert("org.opencontainers.image.source", source);
    labels.insert("org.opencontainers.image.revision", revision);
    labels.insert("org.opencontainers.image.licenses", license);
    labels.insert("org.opencontainers.image.created", created.clone());
    labels.insert("org.opencontainers.image.base.name", "scratch".to_string());
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "author": "relay-guard",
        "config": {
            "Entrypoint": ["/usr/bin/relay-guard"],
            "Cmd": ["--config", "/etc/relay-guard/relay-guard.toml", "run"],
            "Env": ["RUST_LOG=info"],
            "WorkingDir": "/",
            "Labels": labels,
            "ExposedPorts": { "10947/tcp": {} },
            "StopSignal": "SIGTERM",
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": created, "created_by": "cargo xtask image" }],
    });
    let config_blob = write_blob(&out, &json_bytes(&config))?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_blob.digest,
            "size": config_blob.size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_blob.digest,
            "size": layer_blob.size,
        }],
        "annotations": labels,
    });
    let manifest_bytes = json_bytes(&manifest);
    let manifest_blob = write_blob(&out, &manifest_bytes)?;
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_blob.digest,
            "size": manifest_blob.size,
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": { "org.opencontainers.image.ref.name": version },
        }],
    });
    std::fs::write(out.join("index.json"), json_bytes(&index))?;
    std::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;

    if let Some(archive) = &opts.docker_archive {
        docker_archive(archive, &version, &config_blob, &json_bytes(&config), &raw, epoch)?;
    }
    println!(
        "xtask: wrote the OCI image {} (tag {version}, {} bytes compressed)\nxtask: manifest digest {}",
        out.display(),
        layer_blob.size,
        manifest_blob.digest
    );
    Ok(())
}

/// A `docker load` tar: manifest.json, the config and the layer, fixed mtimes.
fn docker_archive(
    path: &Path,
    version: &str,
    config: &Blob,
    config_bytes: &[u8],
    raw: &[u8],
    mtime: u64,
) -> anyhow::Result<()> {
    let config_name = format!("{}.json", config.digest.trim_start_matches("sha256:"));
    let layer_name = format!("{}/layer.tar", sha256(raw).trim_start_matches("sha256:"));
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": [format!("relay-guard:{version}")],
        "Layers": [layer_name],
    }]);
    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    for (name, data) in [
        (config_name.as_str(), config_bytes),
        (layer_name.as_str(), raw),
        ("manifest.json", &json_bytes(&manifest)[..]),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(mtime);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, name, data)?;
    }
    std::fs::write(path, tar.into_inner()?).with_context(|| format!("write {}", path.display()))?;
    println!("xtask: wrote {} (docker load -i)", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_of_known_times() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_172_018), "2026-12-02T00:40:18Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn the_layer_is_the_same_twice_and_sorted() {
        let a = super::layer(b"bin", b"cfg", 1_000).expect("layer");
        let b = super::layer(b"bin", b"cfg", 1_000).expect("layer");
        assert_eq!(a, b);
        let mut t = tar::Archive::new(&a.0[..]);
        let names: Vec<String> = t
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry").path().expect("path").display().to_string())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(names.contains(&"usr/bin/relay-guard".to_string()));
    }
}
