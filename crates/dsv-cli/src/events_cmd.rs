//! `dsv events`: the repository's event log (what triggers consume).

use clap::Args;
use serde_json::Value;

use crate::error::CliError;
use crate::output;
use crate::Ctx;

/// `dsv events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only events after this sequence number.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// At most this many.
    #[arg(long, short = 'n', default_value_t = 1000)]
    limit: usize,
    /// Print only the last sequence number.
    #[arg(long)]
    last: bool,
}

/// Prints events, oldest first.
pub fn events(ctx: &Ctx, a: EventsArgs) -> Result<(), CliError> {
    let repo = dsv::Repo::from_store(crate::repo::open(ctx)?);
    if a.last {
        let n = repo.last_event()?;
        if ctx.json {
            return output::json(&serde_json::json!({ "last": n }));
        }
        println!("{n}");
        return Ok(());
    }
    let evs = repo.events_after(a.after, a.limit)?;
    if ctx.json {
        return output::json(&Value::Array(
            evs.iter()
                .map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
                .collect(),
        ));
    }
    for e in &evs {
        let kind = serde_json::to_value(e.kind)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let what = e
            .version
            .clone()
            .map(|v| format!("@{v}"))
            .or_else(|| {
                e.extra
                    .get("status")
                    .and_then(|s| s.as_str())
                    .map(|s| format!(" {s}"))
            })
            .unwrap_or_default();
        println!(
            "#{:<6} {}  {:<18} {}/{}{}",
            e.seq,
            crate::dataset::iso(e.time_ms),
            kind,
            e.project,
            e.name,
            what
        );
    }
    Ok(())
}
