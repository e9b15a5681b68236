//! What reading one usage event from its stream entry costs the flusher:
//! `cargo run --release --example parse_cost`, or instructions per event
//! with `N=100000 valgrind --tool=callgrind target/release/examples/parse_cost`
//! (the count is steady where the time is not). `FORMAT=json` reads the
//! JSON the rarer scripts write instead of charge.lua's rows; `PER_ENTRY`
//! events share an entry, as a call's charges do (14 under load).

use creditgate::ledger::event::LedgerEvent;

/// A charge event as charge.lua writes it, with realistic ids.
const ROW: &str = "0b0e5c2e-6a8f-4b8a-9d8e-2f7f3c1d9a11\tcharge\tbench\trag\t\t1\t1\t0\t999998765\t0\t1235\t\tusr_01JD2X3Y4Z5A6B7C8D9E0F1G2H\t01JD2X3Y4Z5A6B7C8D9E0F1G2J\tproxy\t1795700000000\t2026-11-27\t2026-11\t2026-11-27";
/// The same event as JSON.
const EVENT: &str = r#"{"k":"charge","e":"0b0e5c2e-6a8f-4b8a-9d8e-2f7f3c1d9a11","m":"rag","a":"","p":"bench","n":1,"fm":1,"fb":0,"mb":999998765,"bb":0,"au":1235,"u":"usr_01JD2X3Y4Z5A6B7C8D9E0F1G2H","r":"01JD2X3Y4Z5A6B7C8D9E0F1G2J","by":"proxy","t":1795700000000,"d":"2026-11-27","ap":"2026-11","ad":"2026-11-27"}"#;

fn main() -> Result<(), String> {
    let var = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let n = var("N", 1_000_000);
    let per_entry = var("PER_ENTRY", 14).max(1);
    let json = std::env::var("FORMAT").is_ok_and(|f| f == "json");
    let entry = if json {
        format!("[{}]", vec![EVENT; per_entry].join(","))
    } else {
        vec![ROW; per_entry].join("\n")
    };
    let start = std::time::Instant::now();
    let mut events = 0;
    while events < n {
        events += if json {
            LedgerEvent::from_entry("1795700000000-3", Some(entry.as_bytes()))?.len()
        } else {
            LedgerEvent::from_rows("1795700000000-3", entry.as_bytes())?.len()
        };
    }
    println!(
        "{events} events, {:?} per event",
        start.elapsed() / events as u32
    );
    Ok(())
}
