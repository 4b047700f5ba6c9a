//! Fused gate kernel, per ISA: tokens/s for the default shape (D = 1024, HC = 4), with its
//! inputs in cache and with the hidden states streamed from memory as in a prefill.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engram::fused::kernels::{gate_token, Ahead, GateParams, Isa};

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
            b.iter(|| {
                gate_token(
                    isa,
                    &p,
                    &proj,
                    &query,
                    Ahead::default(),
                    &mut g,
                    &mut normed,
                )
            })
        });
    }
    // As in a 4096-token prefill: each call the next row of a tile's projections (64 rows,
    // 1.3 MB) and of the hidden states (64 MiB, from memory), through the dispatched ISA.
    let (tile, tokens) = (64, 4096);
    let shifted = |v: &[f32], rows: usize| -> Vec<f32> {
        (0..rows)
            .flat_map(|r| v.iter().map(move |x| x + r as f32 * 1e-3))
            .collect()
    };
    let (ys, qs) = (shifted(&proj, tile), shifted(&query, tokens));
    let (ny, nq) = (proj.len(), query.len());
    let isa = Isa::detect();
    let mut t = 0usize;
    grp.bench_function(format!("{isa:?}/hidden_from_memory"), |b| {
        b.iter(|| {
            t = (t + 1) % tokens;
            let (y, q) = (t % tile, t);
            gate_token(
                isa,
                &p,
                &ys[y * ny..(y + 1) * ny],
                &qs[q * nq..(q + 1) * nq],
                Ahead {
                    query: qs.get((q + 1) * nq..(q + 2) * nq).unwrap_or(&[]),
                    proj: ys.get((y + 1) * ny..(y + 2) * ny).unwrap_or(&[]),
                },
                &mut g,
                &mut normed,
            )
        })
    });
    grp.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
