//! The cryptography ingestion and the event stream pay per event: the keyed hash of a
//! customer id (erasure tag, stream tag; every admitted event takes one on ingestion and
//! one on the worker), and sealing and opening one record of the events topic.
//!
//! `cargo bench --bench privacy`

use criterion::{criterion_group, criterion_main, Criterion};

use tailor::customers::CustomerId;
use tailor::privacy::seal::{open_record, seal_record, BlindIndex, DataKey};

fn hashes(c: &mut Criterion) {
    let index = BlindIndex::new(DataKey::generate());
    let ids: Vec<CustomerId> = (0..1000)
        .map(|i| CustomerId::parse("id", &format!("customer-{i:05}")).expect("id"))
        .collect();
    let mut i = 0;
    c.bench_function("privacy/erasure_tag", |b| {
        b.iter(|| {
            i = (i + 1) % ids.len();
            index.erasure_tag(&ids[i])
        })
    });
}

fn records(c: &mut Criterion) {
    let key = DataKey::generate();
    let tag = "a".repeat(64);
    // A stored page view of about the size the demo sends.
    let event = br#"{"event_id":"0193a5c2-7d4e-7f10-9a3b-5c6d7e8f9a0b","customer_id":"customer-00042","type":"page_view","timestamp":"2026-12-06T04:00:00Z","properties":{"category":"travel","path":"/offers/summer"}}"#;
    c.bench_function("privacy/seal_record", |b| {
        b.iter(|| seal_record(&key, &tag, event))
    });
    let sealed = seal_record(&key, &tag, event);
    c.bench_function("privacy/open_record", |b| {
        b.iter(|| open_record(&key, &tag, &sealed).expect("opens"))
    });
}

criterion_group!(benches, hashes, records);
criterion_main!(benches);
