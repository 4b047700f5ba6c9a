//! N-gram hashing of the default config (layer 1): tokens/s.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engram::{CompressedTokenizer, EngramConfig, NgramHashMapping, Tokenizer};
use std::sync::Arc;

fn bench(c: &mut Criterion) {
    let cfg = EngramConfig::default();
    let tok = Tokenizer::bundled().unwrap();
    let m =
        NgramHashMapping::new(&cfg, Arc::new(CompressedTokenizer::build(&tok).unwrap())).unwrap();
    let l = 4096;
    let ids: Vec<i64> = (0..l as i64).map(|i| (i * 7919) % 128815).collect();
    let mut grp = c.benchmark_group("hashing");
    grp.throughput(Throughput::Elements(l as u64));
    grp.bench_function("compress+hash/4096", |b| {
        b.iter(|| m.hash(1, &ids, l).unwrap())
    });
    grp.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
