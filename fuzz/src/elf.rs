//! The ELF readers of `afetm-elf` on any bytes: symbols and `.eh_frame` (`Module::parse`), the
//! probe site of each function (`probe_site::place`), the unwind rule at each entry, the block
//! and call structure trace point selection reads (`structure::analyze`), and DWARF signatures
//! (`dwarf::signatures_in`). A binary is attacker-controlled input when the agent is pointed at
//! it, so none of these may panic or run away.

use std::{path::Path, sync::Arc};

use afetm_elf::{dwarf, probe_site, structure, symbols::Module};

/// Functions looked at per input: enough to reach every reader, bounded so one input stays fast.
const FUNCTIONS: usize = 256;

/// One input: see the module doc.
pub fn run(data: &[u8]) {
    let bytes: Arc<[u8]> = data.into();
    if let Ok(module) = Module::parse(Path::new("fuzz.elf"), "fuzz".into(), bytes) {
        for f in module.functions().iter().take(FUNCTIONS) {
            let code = module.code(f);
            assert!(code.len() as u64 <= f.end.saturating_sub(f.start), "code longer than its function");
            let _ = probe_site::place(f.start, code);
            let _ = module.frame_rule(f.start);
            let _ = module.plt_name(f.start);
            assert!(module.function_at(f.start).is_some(), "a function's own entry finds no function");
        }
        let _ = structure::analyze(&module);
    }
    let _ = dwarf::signatures_in("fuzz.elf", data);
}
