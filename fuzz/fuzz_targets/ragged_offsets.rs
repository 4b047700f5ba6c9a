//! Ragged batches with any offsets, ids and states: invalid ones are errors; valid ones give
//! the same hashes and (within float tolerance) the same outputs on both paths.
#![no_main]

use engram::ForwardPath;
use engram_fuzz::{tiny_layer, Bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let layer = tiny_layer();
    let c = layer.config().hc_mult * layer.config().hidden_size;
    let mode = b.u8();
    let nseq = (b.u8() % 6) as usize;
    let total = (b.u8() % 40) as usize;
    // Offsets: raw values (mostly invalid), or cumulative lengths that may not add up.
    let mut offsets = vec![0usize; nseq + 1];
    for i in 1..=nseq {
        offsets[i] = if mode & 1 == 0 {
            b.u8() as usize % 48
        } else {
            offsets[i - 1] + b.u8() as usize % 12
        };
    }
    if mode & 2 != 0 {
        if let Some(last) = offsets.last_mut() {
            *last = total;
        }
    }
    let ids: Vec<i64> = (0..total)
        .map(|_| match b.u8() % 4 {
            0 => b.i64(),
            _ => b.u8() as i64 * 500 + b.u8() as i64,
        })
        .collect();
    let hidden: Vec<f32> = (0..total * c)
        .map(|i| (data.get(i % data.len().max(1)).copied().unwrap_or(0) as f32 - 128.0) / 32.0)
        .collect();
    let mut states: Vec<_> = (0..nseq).map(|_| layer.new_state()).collect();
    if mode & 4 != 0 && !states.is_empty() {
        // A state of another shape must be refused.
        states[0] = engram::EngramState::from_parts(vec![0; 1], vec![0.0; 3], c, 5);
    }
    let mut other = states.clone();
    let r = layer.forward_ragged(&mut states, &ids, &hidden, &offsets, ForwardPath::Fused);
    let f = layer.forward_ragged(&mut other, &ids, &hidden, &offsets, ForwardPath::Reference);
    match (r, f) {
        (Ok(x), Ok(y)) => {
            assert_eq!(x.hash_ids, y.hash_ids);
            assert_eq!(x.output.len(), total * c);
            for (p, q) in x.output.iter().zip(&y.output) {
                assert!((p - q).abs() <= 1e-3 * (1.0 + q.abs()), "{p} vs {q}");
            }
            // The carried states agree: same ids and position, conv rows within tolerance
            // (the ring may be rotated differently).
            for (p, q) in states.iter().zip(&other) {
                assert_eq!(p.ngram_history(), q.ngram_history());
                assert_eq!(p.position(), q.position());
                for (x, y) in p.conv_history().iter().zip(q.conv_history()) {
                    assert!((x - y).abs() <= 1e-3 * (1.0 + y.abs()), "{x} vs {y}");
                }
            }
        }
        (Err(_), Err(_)) => {}
        (x, y) => panic!("paths disagree: {:?} vs {:?}", x.err(), y.err()),
    }
});
