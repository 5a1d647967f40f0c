//! Where to put a function's uprobe.
//!
//! x86 uprobes either emulate the probed instruction in the kernel (push of a register, nops,
//! relative jumps and calls: about 0.7 us per hit here) or single-step a copy of it (about 11 us:
//! ../shared/notes/ebpf-toolchain.md). So the probe goes on the function entry when its first
//! instruction is emulated, else on the first emulated instruction of the straight-line
//! prologue, provided nothing before it branches, touches the stack pointer or is the target of
//! a jump inside the function. Then the word at `[rsp]` is still the return address, so the
//! caller is read exactly as at the entry, and every call still passes the probe exactly once.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Formatter, Instruction, InstructionInfoFactory, IntelFormatter, Mnemonic,
    OpKind, Register,
};

/// The probe address chosen for one function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSite {
    /// Virtual address the probe sits at.
    pub vaddr: u64,
    /// The instruction under the probe, in Intel syntax.
    pub instruction: String,
    /// True when the kernel emulates that instruction (cheap hit).
    pub emulated: bool,
}

/// Longest prologue prefix the probe may be moved over.
const MAX_SKIP: usize = 8;

/// Chooses the probe site of the function starting at `entry` whose bytes are `code`.
pub fn place(entry: u64, code: &[u8]) -> ProbeSite {
    let mut decoder = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    let mut prefix: Vec<Instruction> = Vec::new();
    let mut chosen: Option<Instruction> = None;
    while decoder.can_decode() && prefix.len() <= MAX_SKIP {
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
        if is_emulated(&insn) {
            chosen = Some(insn);
            break;
        }
        if !skippable(&insn, &mut info) {
            break;
        }
        prefix.push(insn);
    }
    let first = Decoder::with_ip(64, code, entry, DecoderOptions::NONE).decode();
    let at_entry = || ProbeSite {
        vaddr: entry,
        instruction: format_insn(&first),
        emulated: !first.is_invalid() && is_emulated(&first),
    };
    let Some(site) = chosen else {
        return at_entry();
    };
    if site.ip() != entry && jumped_into(entry, site.ip(), code) {
        return at_entry();
    }
    ProbeSite { vaddr: site.ip(), instruction: format_insn(&site), emulated: true }
}

/// Lengths in bytes of the first `n` instructions at `entry` (fewer where the code ends or an
/// instruction does not decode): what IP+N skips (one instruction by default; the campaign's
/// held-out IP+N skips two).
pub fn instruction_lengths(entry: u64, code: &[u8], n: usize) -> Vec<u32> {
    Decoder::with_ip(64, code, entry, DecoderOptions::NONE)
        .into_iter()
        .take(n)
        .take_while(|i| !i.is_invalid())
        .map(|i| i.len() as u32)
        .collect()
}

/// Instructions the x86 uprobe code emulates instead of single-stepping (arch/x86/kernel/uprobes.c:
/// `push_setup_xol_ops` and `branch_setup_xol_ops`).
pub fn is_emulated(insn: &Instruction) -> bool {
    match insn.mnemonic() {
        Mnemonic::Push => insn.op_count() == 1 && insn.op0_kind() == OpKind::Register && insn.op0_register().is_gpr64(),
        Mnemonic::Nop => true,
        Mnemonic::Jmp | Mnemonic::Call => matches!(insn.op0_kind(), OpKind::NearBranch64),
        _ => insn.flow_control() == FlowControl::ConditionalBranch && matches!(insn.op0_kind(), OpKind::NearBranch64),
    }
}

/// True when moving the probe past `insn` keeps `[rsp]` the return address and keeps every call
/// passing the probe once.
fn skippable(insn: &Instruction, info: &mut InstructionInfoFactory) -> bool {
    if insn.flow_control() != FlowControl::Next || insn.is_stack_instruction() || insn.is_privileged() {
        return false;
    }
    let used = info.info(insn);
    let touches_sp = |r: Register| r.full_register() == Register::RSP;
    !used.used_registers().iter().any(|u| touches_sp(u.register()))
        && !used.used_memory().iter().any(|m| touches_sp(m.base()) || touches_sp(m.index()))
}

/// Whether a branch inside the function lands in (entry, site]: the probe would then fire for
/// something that is not a call.
fn jumped_into(entry: u64, site: u64, code: &[u8]) -> bool {
    let mut decoder = Decoder::with_ip(64, code, entry, DecoderOptions::NONE);
    while decoder.can_decode() {
        let insn = decoder.decode();
        if matches!(insn.op0_kind(), OpKind::NearBranch64)
            && matches!(insn.flow_control(), FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch)
        {
            let t = insn.near_branch_target();
            if t > entry && t <= site {
                return true;
            }
        }
    }
    false
}

fn format_insn(insn: &Instruction) -> String {
    if insn.is_invalid() {
        return "(invalid)".into();
    }
    let mut out = String::new();
    IntelFormatter::new().format(insn, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulated_entry_stays() {
        // push rbp; mov rbp, rsp; ret
        let s = place(0x1000, &[0x55, 0x48, 0x89, 0xe5, 0xc3]);
        assert_eq!(s, ProbeSite { vaddr: 0x1000, instruction: "push rbp".into(), emulated: true });
    }

    #[test]
    fn moves_past_register_moves_to_a_push() {
        // lea rax, [rdi+1]; mov rdx, rsi; push rbx; pop rbx; ret
        let code = [0x48, 0x8d, 0x47, 0x01, 0x48, 0x89, 0xf2, 0x53, 0x5b, 0xc3];
        let s = place(0x2000, &code);
        assert_eq!(s.vaddr, 0x2007);
        assert!(s.emulated);
        assert_eq!(s.instruction, "push rbx");
        // endbr64; push rbp
        let s = place(0x3000, &[0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0xc3]);
        assert_eq!((s.vaddr, s.emulated), (0x3004, true));
    }

    #[test]
    fn never_moves_past_stack_changes_or_branches() {
        // sub rsp, 8; push rbx
        let s = place(0x1000, &[0x48, 0x83, 0xec, 0x08, 0x53, 0xc3]);
        assert_eq!((s.vaddr, s.emulated), (0x1000, false));
        // mov [rsp-8], rdi; push rbx  (writes near the stack pointer)
        let s = place(0x1000, &[0x48, 0x89, 0x7c, 0x24, 0xf8, 0x53, 0xc3]);
        assert_eq!(s.vaddr, 0x1000);
        // test rdi, rdi; je +0; push rbx: the je is itself emulated and nothing before it
        // branches, so it gets the probe; the push after the branch never does.
        let s = place(0x1000, &[0x48, 0x85, 0xff, 0x74, 0x00, 0x53, 0xc3]);
        assert_eq!((s.vaddr, s.instruction.as_str()), (0x1003, "je short 0000000000001005h"));
    }

    #[test]
    fn a_jump_into_the_prefix_keeps_the_entry() {
        // 0: lea rax,[rdi+1]; 4: push rbx; 5: pop rbx; 6: jmp 4 (back to the push); 8: ret
        let code = [0x48, 0x8d, 0x47, 0x01, 0x53, 0x5b, 0xeb, 0xfc, 0xc3];
        let s = place(0x1000, &code);
        assert_eq!((s.vaddr, s.emulated), (0x1000, false));
    }
}
