//! Any bytes as a state file for the tiny layer: a state that loads must carry the layer
//! on by one more token, on both paths, with equal hashes.
#![no_main]

use engram::tensors::TensorFile;
use engram::ForwardPath;
use engram_fuzz::tiny_layer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = TensorFile::from_bytes("fuzz-state.safetensors", data.to_vec()) else {
        return;
    };
    let layer = tiny_layer();
    let Ok(states) = engram::state_io::load_states_from(&f, layer) else {
        return;
    };
    let c = layer.config().hc_mult * layer.config().hidden_size;
    let hidden = vec![0.25f32; c];
    for st in states.iter().take(4) {
        let (mut a, mut b) = (st.clone(), st.clone());
        let ra = layer.forward_chunk(&mut a, &[17], &hidden, ForwardPath::Reference);
        let rb = layer.forward_chunk(&mut b, &[17], &hidden, ForwardPath::Fused);
        match (ra, rb) {
            (Ok(x), Ok(y)) => assert_eq!(x.hash_ids, y.hash_ids),
            (Err(_), Err(_)) => {}
            (x, y) => panic!("paths disagree: {:?} vs {:?}", x.err(), y.err()),
        }
    }
});
