//! Fused output row kernel (gated value + SiLU of 4 dilated taps over RMSNorm'd rows), per
//! ISA, for the default shape (D = 1024, HC = 4).
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engram::fused::kernels::{conv_row, GatedValue, Isa};

fn bench(c: &mut Criterion) {
    let (ch, taps) = (4096, 4);
    let w: Vec<f32> = (0..taps * ch).map(|i| (i as f32 * 0.01).cos()).collect();
    let rows: Vec<Vec<f32>> = (0..taps)
        .map(|k| (0..ch).map(|i| ((i + k) as f32 * 0.3).sin()).collect())
        .collect();
    let refs: Vec<Option<&[f32]>> = rows.iter().map(|r| Some(r.as_slice())).collect();
    let (value, bias): (Vec<f32>, Vec<f32>) = (0..ch / 4)
        .map(|i| ((i as f32 * 0.7).sin(), (i as f32 * 0.2).cos()))
        .unzip();
    let gates = [0.2f32, 0.4, 0.6, 0.8];
    let gv = GatedValue {
        value: &value,
        bias: &bias,
        gates: &gates,
    };
    let mut out = vec![0.0f32; ch];
    let mut grp = c.benchmark_group("conv_row");
    grp.throughput(Throughput::Elements(1));
    for isa in Isa::all_supported() {
        grp.bench_function(format!("{isa:?}"), |b| {
            b.iter(|| conv_row(isa, &w, &refs, &gv, &mut out))
        });
    }
    grp.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
