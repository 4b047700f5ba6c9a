//! Fused output row kernels (gated value + SiLU of 4 dilated taps over RMSNorm'd rows), per
//! ISA, for the default shape (D = 1024, HC = 4, dilation 3): one row by `conv_row`, and
//! three rows a dilation apart by three `conv_row` calls against one `conv_rows3` (six
//! distinct normalised rows between them). Elements are output rows.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engram::fused::kernels::{conv_row, conv_rows3, GatedValue, Isa};

fn bench(c: &mut Criterion) {
    let (ch, taps) = (4096, 4);
    let w: Vec<f32> = (0..taps * ch).map(|i| (i as f32 * 0.01).cos()).collect();
    // Normalised rows t-9, t-6, ..., t+6: row g of a trio (t + 3g) reads rows g..g+4.
    let rows: Vec<Vec<f32>> = (0..taps + 2)
        .map(|k| (0..ch).map(|i| ((i + k) as f32 * 0.3).sin()).collect())
        .collect();
    let taps_of = |g: usize| -> Vec<Option<&[f32]>> {
        (g..g + taps).map(|k| Some(rows[k].as_slice())).collect()
    };
    let trio: Vec<Vec<Option<&[f32]>>> = (0..3).map(taps_of).collect();
    let values: Vec<Vec<f32>> = (0..3)
        .map(|g| (0..ch / 4).map(|i| ((i + g) as f32 * 0.7).sin()).collect())
        .collect();
    let bias: Vec<f32> = (0..ch / 4).map(|i| (i as f32 * 0.2).cos()).collect();
    let gates = [0.2f32, 0.4, 0.6, 0.8];
    let gvs: Vec<GatedValue<'_>> = values
        .iter()
        .map(|v| GatedValue {
            value: v,
            bias: &bias,
            gates: &gates,
        })
        .collect();
    let mut outs = vec![vec![0.0f32; ch]; 3];
    let mut grp = c.benchmark_group("conv_row");
    grp.throughput(Throughput::Elements(1));
    for isa in Isa::all_supported() {
        grp.bench_function(format!("{isa:?}"), |b| {
            b.iter(|| conv_row(isa, &w, &trio[0], &gvs[0], &mut outs[0]))
        });
    }
    grp.finish();
    let mut grp = c.benchmark_group("conv_trio");
    grp.throughput(Throughput::Elements(3));
    for isa in Isa::all_supported() {
        grp.bench_function(format!("{isa:?}/three_conv_row"), |b| {
            b.iter(|| {
                for (g, o) in outs.iter_mut().enumerate() {
                    conv_row(isa, &w, &trio[g], &gvs[g], o);
                }
            })
        });
        grp.bench_function(format!("{isa:?}/conv_rows3"), |b| {
            b.iter(|| {
                let [o0, o1, o2] = &mut outs[..] else {
                    unreachable!()
                };
                conv_rows3(
                    isa,
                    &w,
                    [&trio[0], &trio[1], &trio[2]],
                    [&gvs[0], &gvs[1], &gvs[2]],
                    [o0, o1, o2],
                )
            })
        });
    }
    grp.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
