//! `relay-guard relaytest HOST`: runs the open-relay test once and prints
//! the report (human or JSON). The exit status is the report's
//! (`relaytest::report::EXIT_*`).
use crate::relaytest::{self, Options};

pub async fn execute(opts: Options, json: bool) -> anyhow::Result<i32> {
    if opts.ports.is_empty() {
        anyhow::bail!("no port to test");
    }
    for d in [&opts.from_domain, &opts.to_domain] {
        if d.is_empty() || !d.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c)) {
            anyhow::bail!("`{d}` is not a domain name (letters, digits, `-` and `.`)");
        }
    }
    let report = relaytest::run(&opts).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(report.exit_code())
}
