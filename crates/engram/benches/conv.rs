//! Fused conv row kernel (RMSNorm'd input, 4 dilated taps, SiLU, residual), per ISA.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engram::fused::kernels::{conv_row, Isa};

fn bench(c: &mut Criterion) {
    let (ch, taps) = (4096, 4);
    let w: Vec<f32> = (0..taps * ch).map(|i| (i as f32 * 0.01).cos()).collect();
    let rows: Vec<Vec<f32>> = (0..taps)
        .map(|k| (0..ch).map(|i| ((i + k) as f32 * 0.3).sin()).collect())
        .collect();
    let refs: Vec<Option<&[f32]>> = rows.iter().map(|r| Some(r.as_slice())).collect();
    let mut out = vec![0.0f32; ch];
    let mut grp = c.benchmark_group("conv_row");
    grp.throughput(Throughput::Elements(1));
    for isa in Isa::all_supported() {
        grp.bench_function(format!("{isa:?}"), |b| {
            b.iter(|| conv_row(isa, &w, &refs, &mut out))
        });
    }
    grp.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
