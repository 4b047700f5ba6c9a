//! The README's library example: the seed demo's flow through the library, then the same
//! sequence token by token with carried state. `cargo run --release --example seed_demo`.
use engram::init::{demo_hidden_states, torch_default_weights};
use engram::{Engram, EngramConfig, ForwardPath, NgramHashMapping, Tokenizer};
use std::sync::Arc;

fn main() -> engram::Result<()> {
    let cfg = EngramConfig::default(); // layer 1 of the reference's default config
    let tok = Tokenizer::bundled()?;
    let comp = Arc::new(engram::CompressedTokenizer::build(&tok)?);
    let hashing = Arc::new(NgramHashMapping::new(&cfg, comp)?);
    // Weights as PyTorch creates them after torch.manual_seed(42) (or Engram::load(cfg, path)).
    let (weights, mut g) = torch_default_weights(&cfg, &hashing, 42, &mut |_| {})?;
    let layer = Engram::new(cfg.clone(), hashing, weights)?;

    let ids = tok.encode(
        "Only Alexander the Great could tame the horse Bucephalus.",
        true,
    )?;
    let hidden = demo_hidden_states(&mut g, &cfg, ids.len()); // [1, L, HC, D]
    let out = layer.forward(&ids, &hidden, 1, ids.len(), ForwardPath::Fused)?;
    println!("gates {:?}", &out.gates[..4]);

    // Streaming: the same result token by token, with carried state.
    let mut state = layer.new_state();
    let c = cfg.hc_mult * cfg.hidden_size;
    for t in 0..ids.len() {
        let step = layer.forward_chunk(
            &mut state,
            &ids[t..t + 1],
            &hidden[t * c..(t + 1) * c],
            ForwardPath::Fused,
        )?;
        assert!((step.output[0] - out.output[t * c]).abs() < 1e-5);
    }
    println!("token-by-token decode matches the one-shot forward");
    Ok(())
}
