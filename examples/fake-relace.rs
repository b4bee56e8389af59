//! Run the integration tests' fake Relace upstream on its own, e.g. to point a
//! locally running scopegate or an SDK at it by hand.
//!
//! ```text
//! cargo run --example fake-relace -- [--listen 127.0.0.1:8787]
//! ```

#[path = "../tests/support/fake_relace.rs"]
mod fake_relace;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use fake_relace::{FakeRelace, ACCOUNT_KEY};

const USAGE: &str = "usage: fake-relace [--listen ADDR]   (default 127.0.0.1:8787)";

fn parse_args() -> anyhow::Result<Option<SocketAddr>> {
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 8787));
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--listen" => args.next().context("--listen needs an address")?,
            other => match other.strip_prefix("--listen=") {
                Some(v) => v.to_owned(),
                None => bail!("unknown argument {other:?}\n{USAGE}"),
            },
        };
        listen = value
            .parse()
            .with_context(|| format!("--listen {value:?} is not an IP:PORT address"))?;
    }
    Ok(Some(listen))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Some(listen) = parse_args()? else {
        println!("{USAGE}");
        return Ok(());
    };
    let fake = FakeRelace::start_on(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!(
        "fake-relace listening on {} (account key: {ACCOUNT_KEY})",
        fake.url()
    );

    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut seen = 0;
    loop {
        tokio::select! {
            res = &mut ctrl_c => {
                res.context("waiting for Ctrl-C")?;
                break;
            }
            // The fake wakes waiters on every request, so this prints as
            // requests arrive without polling; the long timeout just re-arms.
            _ = fake.wait_for_requests(seen + 1, Duration::from_secs(3600)) => {
                let requests = fake.requests();
                for r in requests.iter().skip(seen) {
                    println!("{} {}", r.method, r.target);
                }
                seen = requests.len();
            }
        }
    }
    Ok(())
}
