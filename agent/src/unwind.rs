//! Call stacks from a copied window of the user stack, unwound with each module's `.eh_frame`.
//!
//! `bpf_get_stack` only walks frame pointers, which stock server binaries do not keep, so the
//! eBPF program copies `[sp, sp + window)` plus ip/sp/bp and the unwinding happens here, with
//! the CFA rules of the module the instruction belongs to; a function without unwind info falls
//! back to the frame-pointer rule when rbp points into the window.

use std::sync::Arc;

use agent_common::{EventHeader, UnwindStep};

use crate::symbols::{FrameRule, Module};

/// Registers and stack copy of one call-stack event.
pub struct StackSnapshot<'a> {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub stack: &'a [u8],
}

impl<'a> StackSnapshot<'a> {
    pub fn new(hdr: &EventHeader, stack: &'a [u8]) -> Self {
        StackSnapshot { ip: hdr.ip, sp: hdr.sp, bp: hdr.bp, stack }
    }

    fn read(&self, addr: u64) -> Option<u64> {
        let off = addr.checked_sub(self.sp)? as usize;
        let bytes = self.stack.get(off..off.checked_add(8)?)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }
}

/// Return addresses from the innermost caller outwards. `locate` maps a runtime address to its
/// module and the module's virtual address. Stops at the outermost frame (undefined return
/// address), at the end of the window, at an address no module claims, or after `max_frames`.
///
/// `learn(key, rule)` is told every step taken from the `.eh_frame` rule of an address alone
/// (key = the probe address for the first frame, the return address for the others): the
/// steps the kernel may repeat without a stack copy (`agent_common::UnwindStep`; the walk in
/// agent-ebpf mirrors this loop). The frame-pointer guess below depends on registers, so it is
/// never learnt.
pub fn unwind(
    snap: &StackSnapshot,
    max_frames: usize,
    mut locate: impl FnMut(u64) -> Option<(Arc<Module>, u64)>,
    mut learn: impl FnMut(u64, FrameRule),
) -> Vec<u64> {
    let mut out = Vec::new();
    let (mut sp, mut bp) = (snap.sp, snap.bp);
    // The first lookup uses the exact probe address; later ones use ret - 1, inside the call.
    let mut lookup = snap.ip;
    while out.len() < max_frames {
        let key = out.last().copied().unwrap_or(snap.ip);
        let Some((module, vaddr)) = locate(lookup) else {
            break;
        };
        let learnt = module.frame_rule(vaddr);
        if let Some(rule) = learnt {
            learn(key, rule);
        }
        let rule = learnt.or_else(|| {
            let in_window = bp >= sp && bp < snap.sp + snap.stack.len() as u64;
            in_window.then_some(FrameRule {
                cfa_from_rbp: true,
                cfa_offset: 16,
                ra_offset: Some(-8),
                rbp_offset: Some(-16),
            })
        });
        let Some(rule) = rule else { break };
        let base = if rule.cfa_from_rbp { bp } else { sp };
        let Some(cfa) = base.checked_add_signed(rule.cfa_offset) else {
            break;
        };
        let Some(ra_off) = rule.ra_offset else { break };
        let Some(ra) = cfa.checked_add_signed(ra_off).and_then(|a| snap.read(a)) else {
            break;
        };
        if let Some(o) = rule.rbp_offset {
            match cfa.checked_add_signed(o).and_then(|a| snap.read(a)) {
                Some(v) => bp = v,
                None => break,
            }
        }
        if ra == 0 || cfa <= sp && !out.is_empty() {
            break; // end of chain, or no progress: garbage
        }
        sp = cfa;
        out.push(ra);
        lookup = ra - 1;
    }
    out
}

/// The kernel's form of an `.eh_frame` step (`None` when an offset does not fit the map's
/// 32-bit fields: that address then always gets a stack copy).
pub fn kernel_step(rule: &FrameRule) -> Option<UnwindStep> {
    let Some(ra) = rule.ra_offset else {
        return Some(UnwindStep::End);
    };
    Some(UnwindStep::Rule {
        cfa_from_rbp: rule.cfa_from_rbp,
        cfa_offset: i32::try_from(rule.cfa_offset).ok()?,
        ra_offset: i32::try_from(ra).ok()?,
        rbp_offset: match rule.rbp_offset {
            Some(o) => Some(i32::try_from(o).ok()?),
            None => None,
        },
    })
}
