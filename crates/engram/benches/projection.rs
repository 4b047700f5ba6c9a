//! The projection GEMM ([Dm] -> [(1+HC)·D], default shape) for f32 and bf16: tokens/s and
//! GFLOP/s (criterion reports elements = tokens; FLOPs = 2·Dm·(1+HC)·D per token), 1, 2,
//! 3, 4 and 8 rows also on every thread (decode steps of those B); then the same on every
//! thread at once in a prefill's tiles (the layer's default tile for the kernel: 256 rows
//! for AVX2, 64 for the others). Where the CPU has AMX or a bf16 dot instruction, the
//! widening bf16 kernel of the same ISA runs beside them.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engram::fused::proj::{Bf16Via, PanelKernel, Projection};
use engram::DType;

fn bench(c: &mut Criterion) {
    let (k, d, mats) = (1024usize, 1024usize, 5usize);
    let w: Vec<Vec<f32>> = (0..mats)
        .map(|m| {
            (0..d * k)
                .map(|i| ((i * 7 + m) % 113) as f32 / 113.0 - 0.5)
                .collect()
        })
        .collect();
    let refs: Vec<&[f32]> = w.iter().map(|m| m.as_slice()).collect();
    let mut grp = c.benchmark_group("projection");
    grp.sample_size(10);
    // The `gemm` crate and every microkernel this CPU runs.
    let mut kernels: Vec<Option<PanelKernel>> = vec![None];
    kernels.extend(PanelKernel::all_supported().into_iter().map(Some));
    // Each bf16 kernel this CPU runs (AMX, the bf16 dot instruction, the widening kernel),
    // so that they can be set against each other on one CPU.
    let mut variants = Vec::new();
    for kernel in kernels {
        variants.push((kernel, DType::F32, Bf16Via::Dot));
        let mut names = Vec::new();
        for via in [Bf16Via::Amx, Bf16Via::Dot, Bf16Via::Widen] {
            let name = Projection::pack_for_via(&refs, k, DType::Bf16, kernel, via).kernel_name();
            if !names.contains(&name) {
                names.push(name);
                variants.push((kernel, DType::Bf16, via));
            }
        }
    }
    for (kernel, dtype, via) in variants.iter().copied() {
        let p = Projection::pack_for_via(&refs, k, dtype, kernel, via);
        let name = p.kernel_name().replace(' ', "_");
        for rows in [1usize, 2, 3, 4, 8, 64, 256] {
            let x: Vec<f32> = (0..rows * k).map(|i| (i % 97) as f32 / 97.0).collect();
            let mut y = vec![0.0f32; rows * p.n()];
            grp.throughput(Throughput::Elements(rows as u64));
            grp.bench_function(format!("{name}/rows{rows}/1thread"), |b| {
                b.iter(|| p.matmul(&x, rows, &mut y, 1))
            });
            if rows <= 8 {
                // A decode step's shape (B = rows) on every thread, called from outside
                // the pool (criterion's thread), as a serving loop calls it.
                let threads = rayon::current_num_threads();
                grp.bench_function(format!("{name}/rows{rows}/{threads}threads"), |b| {
                    b.iter(|| p.matmul(&x, rows, &mut y, threads))
                });
            }
        }
    }
    grp.finish();

    // As a prefill runs it: every thread on rows of its own, in the layer's tiles
    // (`Projection::default_tile_rows`), each tile one call on one thread (so that each
    // tile streams the weights from L3 once).
    let threads = rayon::current_num_threads();
    let per_thread = 2048usize;
    let mut grp = c.benchmark_group("projection_layer_tiles");
    grp.sample_size(10);
    grp.throughput(Throughput::Elements((threads * per_thread) as u64));
    for (kernel, dtype, via) in variants.iter().copied().filter(|v| v.0.is_some()) {
        let p = Projection::pack_for_via(&refs, k, dtype, kernel, via);
        let name = p.kernel_name().replace(' ', "_");
        let tile = p.default_tile_rows();
        let xs: Vec<Vec<f32>> = (0..threads)
            .map(|t| {
                (0..per_thread * k)
                    .map(|i| ((i + t) % 97) as f32 / 97.0)
                    .collect()
            })
            .collect();
        let mut ys: Vec<Vec<f32>> = (0..threads).map(|_| vec![0.0f32; tile * p.n()]).collect();
        grp.bench_function(
            format!("{name}/{threads}x{per_thread}rows/tiles{tile}"),
            |b| {
                b.iter(|| {
                    use rayon::prelude::*;
                    ys.par_iter_mut().zip(&xs).for_each(|(y, x)| {
                        for t in x.chunks_exact(tile * k) {
                            p.matmul(t, tile, y, 1);
                        }
                    })
                })
            },
        );
    }
    grp.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
