//! What reading one usage event from its stream entry costs the flusher:
//! `cargo run --release --example parse_cost`, or instructions per event
//! with `N=100000 valgrind --tool=callgrind target/release/examples/parse_cost`
//! (the count is steady where the time is not).

use creditgate::ledger::event::LedgerEvent;

/// A charge event as charge.lua writes it, with realistic ids.
const EVENT: &str = r#"{"k":"charge","e":"0b0e5c2e-6a8f-4b8a-9d8e-2f7f3c1d9a11","m":"rag","a":"","p":"bench","n":1,"fm":1,"fb":0,"mb":999998765,"bb":0,"au":1235,"u":"usr_01JD2X3Y4Z5A6B7C8D9E0F1G2H","r":"01JD2X3Y4Z5A6B7C8D9E0F1G2J","by":"proxy","t":1795700000000,"d":"2026-11-27","ap":"2026-11","ad":"2026-11-27"}"#;

fn main() -> Result<(), String> {
    let n: u32 = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let start = std::time::Instant::now();
    let mut events = 0;
    for _ in 0..n {
        events += LedgerEvent::from_entry("1795700000000-3", Some(EVENT.as_bytes()))?.len();
    }
    println!("{events} events, {:?} per event", start.elapsed() / n);
    Ok(())
}
