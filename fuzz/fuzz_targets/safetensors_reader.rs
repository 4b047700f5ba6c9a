//! Any bytes as a safetensors file: parsing, every tensor read as f32 and as i64, and a
//! weights load for the tiny layer. Errors are fine; panics, aborts and hangs are not.
#![no_main]

use engram::tensors::TensorFile;
use engram_fuzz::{tiny_config, tiny_layer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = TensorFile::from_bytes("fuzz.safetensors", data.to_vec()) else {
        return;
    };
    let _ = f.metadata().len();
    for name in f.names() {
        let (_, shape) = f.info(&name).expect("a listed tensor has info");
        if let Ok(t) = f.f32(&name, None) {
            assert_eq!(t.data.len(), shape.iter().product::<usize>());
        }
        if let Ok(t) = f.i64(&name, Some(&shape)) {
            assert_eq!(t.data.len(), shape.iter().product::<usize>());
        }
    }
    let layer = tiny_layer();
    let offsets: Vec<i64> = layer
        .layer_params()
        .offsets()
        .iter()
        .map(|&o| o as i64)
        .collect();
    let rows = layer.layer_params().table_rows() as usize;
    if let Ok(w) = engram::EngramWeights::load_from(&f, &tiny_config(), &offsets, rows) {
        // Loaded weights must make a usable layer (or a clear error).
        let _ = engram::Engram::new(tiny_config(), layer.hashing().clone(), w);
    }
});
