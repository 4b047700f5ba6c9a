//! Any text as a config JSON: a config that validates must have checked sizes, a memory
//! plan and a JSON form that reads back equal.
#![no_main]

use engram::budget::{forward_plan, RunShape};
use engram::EngramConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = EngramConfig::from_json_str(text) else {
        return;
    };
    let sizes = cfg.sizes().expect("a valid config has sizes");
    assert_eq!(sizes.heads, cfg.num_heads() as u64);
    assert_eq!(sizes.memory_width, cfg.memory_width() as u64);
    let run = RunShape {
        tokens: 1 << 20,
        sequences: 64,
        all_stages: true,
        bf16_table_copy: true,
        table_rows: sizes.table_rows_estimate,
        threads: 8,
        table_in_ram: true,
        table_elem_bytes: 4,
    };
    let _ = forward_plan(&cfg, &run);
    let back = EngramConfig::from_json_str(&cfg.to_json_string()).expect("round trip");
    assert_eq!(back, cfg);
});
