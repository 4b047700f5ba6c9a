//! Fused gate kernel, per ISA: tokens/s for the default shape (D = 1024, HC = 4).
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engram::fused::kernels::{gate_token, GateParams, Isa};

fn bench(c: &mut Criterion) {
    let (d, hc) = (1024, 4);
    let v = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
    let proj = v((1 + hc) * d, 0.37);
    let query = v(hc * d, 0.11);
    let vb = v(d, 0.5);
    let per = |s: f32| (0..hc).map(|i| v(d, s + i as f32)).collect::<Vec<_>>();
    let (kb, n12, cn) = (per(0.3), per(0.7), per(0.9));
    let p = GateParams {
        value_bias: &vb,
        key_bias: &kb,
        norm12: &n12,
        conv_norm: &cn,
    };
    let (mut g, mut normed) = (vec![0.0; hc], vec![0.0; hc * d]);
    let mut grp = c.benchmark_group("gate_token");
    grp.throughput(Throughput::Elements(1));
    for isa in Isa::all_supported() {
        grp.bench_function(format!("{isa:?}"), |b| {
            b.iter(|| gate_token(isa, &p, &proj, &query, &mut g, &mut normed))
        });
    }
    grp.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
