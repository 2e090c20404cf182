//! One module per subcommand (bpfman's `cli/` shape). These are the CLI
//! boundary: they print, and return anyhow errors with context.
pub mod bans;
pub mod check_config;
pub mod detach;
pub mod explain;
pub mod relaytest;
pub mod run;
pub mod status;
pub mod top;

use crate::{
    cli::{Cli, Command},
    config::ConfigFile,
};

/// Runs the parsed command line; returns the process exit code.
pub async fn execute(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run { metrics_listen } => run::execute(&cli.config, metrics_listen).await.map(|()| 0),
        Command::CheckConfig { json } => Ok(check_config::execute(&cli.config, json)),
        Command::Detach => detach::execute(&cli.config).map(|()| 0),
        Command::Status { json } => status::execute(&cli.config, json).map(|()| 0),
        Command::Explain { addr, port, json } => explain::execute(&cli.config, addr, port, json),
        Command::Top { limit, json } => top::execute(&cli.config, limit, json).map(|()| 0),
        Command::Relaytest {
            host,
            ports,
            from_domain,
            to_domain,
            timeout,
            xclient,
            json,
        } => {
            relaytest::execute(
                crate::relaytest::Options {
                    host,
                    ports,
                    from_domain,
                    to_domain,
                    timeout,
                    xclient,
                },
                json,
            )
            .await
        }
        Command::Ban { target, length, ban } => {
            bans::ban(&cli.config, &target, length.as_deref(), ban.as_deref()).map(|()| 0)
        }
        Command::Unban { target, ban } => bans::unban(&cli.config, &target, ban.as_deref()),
        Command::Bans { json } => bans::list(&cli.config, json).map(|()| 0),
    }
}

/// Reads the text of the config at `config_path`, once for everything a
/// command needs from it (parse it with [`ConfigFile::parse`]).
pub(crate) fn config_text(config_path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    crate::config::read_text(config_path).with_context(|| format!("failed to read config {}", config_path.display()))
}

/// The `pin_dir` a config names. status, explain, top and detach need only
/// this from the config, so they work with a config whose list files are
/// gone. A config that is not valid TOML, or whose `pin_dir` is not a
/// string or not an acceptable path, is an error: these commands never fall
/// back to the default `pin_dir` (that could be another instance's).
pub(crate) fn pin_dir_of(file: &ConfigFile) -> anyhow::Result<std::path::PathBuf> {
    let config_path = file.path;
    let value = file.value("pin_dir").map_err(|e| {
        anyhow::anyhow!(
            "config {} does not parse, so its pin_dir is unknown (nothing done): {}",
            config_path.display(),
            e.message().trim_end()
        )
    })?;
    let dir: std::path::PathBuf = match value {
        None => crate::config::DEFAULT_PIN_DIR.into(),
        Some(toml::de::DeValue::String(s)) => s.as_ref().into(),
        Some(other) => anyhow::bail!(
            "config {}: pin_dir must be a string, not a {} (nothing done)",
            config_path.display(),
            other.type_str()
        ),
    };
    if let Some(why) = crate::config::pin_dir_problem(&dir) {
        anyhow::bail!(
            "config {}: pin_dir `{}` {why} (nothing done)",
            config_path.display(),
            dir.display()
        );
    }
    Ok(dir.components().collect())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{config_text, pin_dir_of};
    use crate::config::ConfigFile;

    fn pin_dir_from(text: &str) -> anyhow::Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!("rg-pin-dir-of-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join(format!("c{}.toml", text.len()));
        std::fs::write(&path, text).expect("write");
        let r = config_text(&path).and_then(|text| pin_dir_of(&ConfigFile::parse(&path, &text)));
        let _ = std::fs::remove_file(&path);
        r
    }

    /// status, explain, top and detach never fall back to the default
    /// pin_dir for a config they cannot read the pin_dir of.
    #[test]
    fn pin_dir_of_refuses_what_it_cannot_read() {
        for (text, why) in [
            (
                "interfaces = [\"eth0\"\npin_dir = \"/sys/fs/bpf/x\"\n",
                "does not parse",
            ),
            ("pin_dir = 7\n", "must be a string"),
            ("pin_dir = \"relative\"\n", "absolute"),
            ("pin_dir = \"/sys/fs/bpf\"\n", "root of a file system"),
            ("pin_dir = \"/sys/fs/bpf/a/../..\"\n", "`..`"),
        ] {
            let e = pin_dir_from(text).expect_err(text).to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
        assert_eq!(
            pin_dir_from("interfaces = [\"eth0\"]\n").expect("valid"),
            PathBuf::from(crate::config::DEFAULT_PIN_DIR)
        );
        assert_eq!(
            pin_dir_from("pin_dir = \"/sys/fs/bpf/rg/\"\n").expect("valid"),
            PathBuf::from("/sys/fs/bpf/rg")
        );
    }
}
