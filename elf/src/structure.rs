//! The structure AFETM's trace point selection covers (sec. III.A): the basic blocks B of every
//! function and, for each function f_j, the blocks that call it (h_ij = 1).
//!
//! The paper computes this on LLVM IR; we read the machine code of the binary users run
//! (iced-x86), so it works on stripped and third-party builds too. Blocks start at a function
//! entry, at every branch target inside the function, and after every branch or return; as in
//! IR, a call does not end a block. Direct calls (and tail jumps to another function's entry)
//! resolve to the function they enter; calls to PLT stubs to the imported name (recorded, but
//! not part of the cover: those functions live in other modules); indirect calls are counted
//! as unresolved.

use std::collections::BTreeSet;

use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind};
use serde::{Deserialize, Serialize};

use crate::symbols::Module;

/// Counts for `afetm-analyzer structure`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub functions: usize,
    pub blocks: usize,
    /// Direct calls (and tail jumps) resolved to a function of this module.
    pub call_edges: usize,
    /// Calls through the PLT to another module.
    pub plt_calls: usize,
    /// Calls through the PLT to a function this module defines (counted in `call_edges` too).
    pub own_plt_calls: usize,
    pub indirect_calls: usize,
    /// Direct calls into the middle of a function or outside any known function.
    pub unresolved_calls: usize,
}

/// One function's share of the structure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FunctionInfo {
    pub name: String,
    pub start: u64,
    pub end: u64,
    /// Global ids of this function's blocks: `first_block .. first_block + blocks`.
    pub first_block: u32,
    pub blocks: u32,
    /// Whether the kernel emulates the instruction under this function's probe (where
    /// [`crate::probe_site::place`] puts it) instead of single-stepping it: the probe's cost
    /// class for cost-aware selection. Structure files written before this field read as
    /// emulated.
    #[serde(default = "emulated_default")]
    pub emulated: bool,
}

fn emulated_default() -> bool {
    true
}

/// The sets B and h of one module, ready for `selection::Instance`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Structure {
    pub module: String,
    pub functions: Vec<FunctionInfo>,
    pub blocks: usize,
    /// `covers[j]`: ids of the blocks that call function `j` (sorted, unique).
    pub covers: Vec<Vec<u32>>,
    /// Imported functions called through the PLT, with the blocks calling them.
    pub imports: Vec<(String, Vec<u32>)>,
    pub counts: Counts,
}

/// Reads the structure of every function of `module`.
pub fn analyze(module: &Module) -> Structure {
    let funcs = module.functions();
    let by_start: std::collections::HashMap<u64, usize> = funcs.iter().enumerate().map(|(i, f)| (f.start, i)).collect();
    let mut covers: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); funcs.len()];
    let mut imports: std::collections::BTreeMap<String, BTreeSet<u32>> = Default::default();
    let mut infos = Vec::with_capacity(funcs.len());
    let mut counts = Counts { functions: funcs.len(), ..Counts::default() };
    let mut next_block = 0u32;
    for f in funcs {
        let code = module.code(f);
        let insns: Vec<_> = {
            let mut d = Decoder::with_ip(64, code, f.start, DecoderOptions::NONE);
            let mut v = Vec::new();
            while d.can_decode() {
                let i = d.decode();
                if i.is_invalid() {
                    break;
                }
                v.push(i);
            }
            v
        };
        // Leaders: entry, branch targets inside, and whatever follows a branch or return.
        let mut leaders: BTreeSet<u64> = BTreeSet::new();
        leaders.insert(f.start);
        for i in &insns {
            match i.flow_control() {
                FlowControl::Next | FlowControl::Call | FlowControl::IndirectCall => {}
                fc => {
                    leaders.insert(i.next_ip());
                    if matches!(fc, FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch)
                        && matches!(i.op0_kind(), OpKind::NearBranch64)
                    {
                        let t = i.near_branch_target();
                        if t >= f.start && t < f.end {
                            leaders.insert(t);
                        }
                    }
                }
            }
        }
        leaders.retain(|a| *a < f.end);
        let leaders: Vec<u64> = leaders.into_iter().collect();
        let block_of = |ip: u64| next_block + (leaders.partition_point(|l| *l <= ip).saturating_sub(1)) as u32;
        for i in &insns {
            let target = matches!(i.op0_kind(), OpKind::NearBranch64).then(|| i.near_branch_target());
            match (i.flow_control(), target) {
                (FlowControl::Call, Some(t)) | (FlowControl::UnconditionalBranch, Some(t)) => {
                    let is_call = i.flow_control() == FlowControl::Call;
                    if !is_call && t >= f.start && t < f.end {
                        continue; // a jump inside the function
                    }
                    if let Some(&j) = by_start.get(&t) {
                        covers[j].insert(block_of(i.ip()));
                        counts.call_edges += 1;
                    } else if let Some(name) = module.plt_name(t) {
                        // A shared library calls its own exported functions through its PLT
                        // (interposition): those still cover the module's function.
                        match module.find(name).as_slice() {
                            [own] => {
                                covers[by_start[&own.start]].insert(block_of(i.ip()));
                                counts.call_edges += 1;
                                counts.own_plt_calls += 1;
                            }
                            _ => {
                                imports.entry(name.to_string()).or_default().insert(block_of(i.ip()));
                                counts.plt_calls += 1;
                            }
                        }
                    } else if is_call {
                        counts.unresolved_calls += 1;
                    }
                }
                (FlowControl::IndirectCall, _) => counts.indirect_calls += 1,
                _ => {}
            }
        }
        let n = leaders.len() as u32;
        infos.push(FunctionInfo {
            name: f.name.to_string(),
            start: f.start,
            end: f.end,
            first_block: next_block,
            blocks: n,
            emulated: crate::probe_site::place(f.start, module.code(f)).emulated,
        });
        next_block += n;
    }
    counts.blocks = next_block as usize;
    Structure {
        module: module.name.clone(),
        functions: infos,
        blocks: next_block as usize,
        covers: covers.into_iter().map(|c| c.into_iter().collect()).collect(),
        imports: imports.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect(),
        counts,
    }
}
