//! What the agent knows about a binary or shared library: its functions, its loadable segments
//! and its `.eh_frame` unwind rules.
//!
//! Function bounds come from `.symtab`, else `.dynsym`; functions that neither names (stripped
//! binaries: Debian's servers keep only `.dynsym`) are taken from `.eh_frame` FDE ranges and
//! named `<module>+0x<address>`. Names that occur more than once in a module (static functions
//! of different files) become `name@0x<address>` so every function has one unambiguous name.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use gimli::{
    BaseAddresses, CfaRule, EhFrame, EndianArcSlice, LittleEndian, RegisterRule, UnwindContext, UnwindSection, X86_64,
};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, ObjectSymbolTable, SymbolKind};

type Reader = EndianArcSlice<LittleEndian>;

#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not an ELF object this agent can read: {source}")]
    Parse { path: PathBuf, source: object::Error },
    #[error("{path}: not an x86-64 ELF object")]
    Arch { path: PathBuf },
}

/// A function of a module. Addresses are the module's virtual addresses (link-time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub start: u64,
    pub end: u64,
    /// Unique within the module.
    pub name: Arc<str>,
    /// The symbol name without the `@0x...` disambiguation.
    pub base_name: Arc<str>,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    vaddr: u64,
    offset: u64,
    filesz: u64,
}

/// How to find the caller's frame from a given instruction (one `.eh_frame` table row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRule {
    /// CFA = rsp + off (`false`) or rbp + off (`true`).
    pub cfa_from_rbp: bool,
    pub cfa_offset: i64,
    /// The return address is at CFA + this; `None` marks the outermost frame.
    pub ra_offset: Option<i64>,
    /// The caller's rbp is saved at CFA + this; `None` = rbp unchanged.
    pub rbp_offset: Option<i64>,
}

struct EhIndex {
    section: EhFrame<Reader>,
    bases: BaseAddresses,
    /// (start, end, fde), sorted by start.
    fdes: Vec<(u64, u64, gimli::FrameDescriptionEntry<Reader>)>,
    cache: Mutex<HashMap<u64, Option<FrameRule>>>,
}

/// A parsed ELF module.
pub struct Module {
    pub path: PathBuf,
    /// Basename, used as the module's name on the wire.
    pub name: String,
    funcs: Vec<Function>,
    by_name: HashMap<Arc<str>, Vec<usize>>,
    segments: Vec<Segment>,
    data: Arc<[u8]>,
    eh: Option<EhIndex>,
    /// PLT stub address -> imported function name.
    plt: HashMap<u64, Arc<str>>,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module").field("path", &self.path).field("functions", &self.funcs.len()).finish()
    }
}

const CACHE_LIMIT: usize = 1 << 16;

impl Module {
    /// Loads `path`, naming the module after the file's basename.
    /// Loads `path` under its real file name (symlinks resolved, as processes map it), so
    /// `.eh_frame`-only functions get the same names here as in the agent.
    pub fn load(path: &Path) -> Result<Module, SymbolError> {
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let name =
            real.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
        Module::load_as(path, name)
    }

    /// Loads `path` under the module name `name`, which also prefixes the names of functions
    /// known only from `.eh_frame`. Every place that names a module must pass the same name for
    /// the same file (its real basename, not a symlink's), or one function gets two names.
    pub fn load_as(path: &Path, name: String) -> Result<Module, SymbolError> {
        let data: Arc<[u8]> =
            std::fs::read(path).map_err(|source| SymbolError::Io { path: path.into(), source })?.into();
        Module::parse(path, name, data)
    }

    /// Reads a module from the bytes of an ELF file; `path` only names it (in errors and
    /// [`Module::path`]-style output). The fuzz target `elf` enters here.
    pub fn parse(path: &Path, name: String, data: Arc<[u8]>) -> Result<Module, SymbolError> {
        let file = object::File::parse(&*data).map_err(|source| SymbolError::Parse { path: path.into(), source })?;
        if file.architecture() != object::Architecture::X86_64 {
            return Err(SymbolError::Arch { path: path.into() });
        }
        let segments: Vec<Segment> = file
            .segments()
            .map(|s| {
                let (offset, filesz) = s.file_range();
                Segment { vaddr: s.address(), offset, filesz }
            })
            .collect();
        let plt_ranges: Vec<(u64, u64)> = file
            .sections()
            .filter(|s| s.name().is_ok_and(|n| n.starts_with(".plt")))
            .map(|s| (s.address(), s.address().saturating_add(s.size())))
            .collect();
        let in_plt = |a: u64| plt_ranges.iter().any(|(s, e)| a >= *s && a < *e);

        let mut raw: Vec<(u64, u64, String)> = Vec::new();
        for sym in file.symbols().chain(file.dynamic_symbols()) {
            if sym.kind() != SymbolKind::Text || !sym.is_definition() || sym.size() == 0 || sym.address() == 0 {
                continue;
            }
            let Ok(n) = sym.name() else { continue };
            if n.is_empty() {
                continue;
            }
            // Versioned dynamic names (`foo@@VER`) read as `foo`.
            let n = n.split('@').next().unwrap_or(n);
            // A symbol that ends past the address space is corrupt: leave it out.
            let Some(end) = sym.address().checked_add(sym.size()) else { continue };
            raw.push((sym.address(), end, n.to_string()));
        }
        let eh = load_eh(&file, &data);
        if let Some(eh) = &eh {
            for (start, end, _) in &eh.fdes {
                if !in_plt(*start) {
                    raw.push((*start, *end, String::new()));
                }
            }
        }
        // Symbols first (stable sort keeps symtab before dynsym before FDEs at one address).
        raw.sort_by_key(|(s, _, n)| (*s, n.is_empty()));
        let mut funcs: Vec<Function> = Vec::new();
        for (start, end, n) in raw {
            if let Some(last) = funcs.last()
                && (last.start == start || start < last.end && n.is_empty())
            {
                continue; // alias, or an FDE inside a known function
            }
            let n: Arc<str> = if n.is_empty() { format!("{name}+0x{start:x}").into() } else { n.into() };
            funcs.push(Function { start, end, name: n.clone(), base_name: n });
        }
        let mut counts: HashMap<Arc<str>, usize> = HashMap::new();
        for f in &funcs {
            *counts.entry(f.base_name.clone()).or_insert(0) += 1;
        }
        for f in &mut funcs {
            if counts[&f.base_name] > 1 {
                f.name = format!("{}@0x{:x}", f.base_name, f.start).into();
            }
        }
        let mut by_name: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        for (i, f) in funcs.iter().enumerate() {
            by_name.entry(f.name.clone()).or_default().push(i);
            if f.name != f.base_name {
                by_name.entry(f.base_name.clone()).or_default().push(i);
            }
        }
        let plt = load_plt(&file);
        Ok(Module { path: path.into(), name, funcs, by_name, segments, data, eh, plt })
    }

    pub fn functions(&self) -> &[Function] {
        &self.funcs
    }

    /// Functions a plan name refers to: its unique name, or every function with that base name.
    pub fn find(&self, name: &str) -> Vec<&Function> {
        self.by_name.get(name).map(|ix| ix.iter().map(|i| &self.funcs[*i]).collect()).unwrap_or_default()
    }

    /// The function containing virtual address `vaddr`.
    pub fn function_at(&self, vaddr: u64) -> Option<&Function> {
        let i = self.funcs.partition_point(|f| f.start <= vaddr);
        let f = self.funcs.get(i.checked_sub(1)?)?;
        (vaddr < f.end).then_some(f)
    }

    pub fn vaddr_to_offset(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| vaddr >= s.vaddr && vaddr - s.vaddr < s.filesz)
            .and_then(|s| (vaddr - s.vaddr).checked_add(s.offset))
    }

    pub fn offset_to_vaddr(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| offset >= s.offset && offset - s.offset < s.filesz)
            .and_then(|s| (offset - s.offset).checked_add(s.vaddr))
    }

    /// The machine code of `f` (empty when the file does not hold it).
    pub fn code(&self, f: &Function) -> &[u8] {
        let Some(off) = self.vaddr_to_offset(f.start) else {
            return &[];
        };
        let len = (f.end - f.start) as usize;
        let off = off as usize;
        self.data.get(off..off.saturating_add(len).min(self.data.len())).unwrap_or(&[])
    }

    /// The imported function a PLT stub at `vaddr` jumps to.
    pub fn plt_name(&self, vaddr: u64) -> Option<&str> {
        self.plt.get(&vaddr).map(|s| &**s)
    }

    /// The `.eh_frame` rule for the instruction at `vaddr`, cached.
    pub fn frame_rule(&self, vaddr: u64) -> Option<FrameRule> {
        let eh = self.eh.as_ref()?;
        if let Ok(cache) = eh.cache.lock()
            && let Some(r) = cache.get(&vaddr)
        {
            return *r;
        }
        let rule = eh.rule(vaddr);
        if let Ok(mut cache) = eh.cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(vaddr, rule);
        }
        rule
    }
}

/// Maps PLT stubs to the imported names their GOT slots are relocated against: each stub's
/// `jmp [rip+slot]` names a GOT slot, whose JUMP_SLOT/GLOB_DAT relocation names the symbol.
fn load_plt(file: &object::File) -> HashMap<u64, Arc<str>> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    let mut slots: HashMap<u64, Arc<str>> = HashMap::new();
    if let (Some(relocs), Some(dynsyms)) = (file.dynamic_relocations(), file.dynamic_symbol_table()) {
        for (offset, r) in relocs {
            if let object::RelocationTarget::Symbol(idx) = r.target()
                && let Ok(name) = dynsyms.symbol_by_index(idx).and_then(|s| s.name().map(str::to_string))
            {
                let name = name.split('@').next().unwrap_or(&name).to_string();
                slots.insert(offset, name.into());
            }
        }
    }
    let mut out = HashMap::new();
    for sec in file.sections().filter(|s| s.name().is_ok_and(|n| n.starts_with(".plt"))) {
        let Ok(code) = sec.data() else { continue };
        let base = sec.address();
        let mut decoder = Decoder::with_ip(64, code, base, DecoderOptions::NONE);
        while decoder.can_decode() {
            let insn = decoder.decode();
            if insn.flow_control() == FlowControl::IndirectBranch
                && insn.is_ip_rel_memory_operand()
                && let Some(name) = slots.get(&insn.ip_rel_memory_address())
            {
                // Stubs are 16-byte entries; calls land on the entry's first byte.
                // Wrapping: the decoder's ip wraps at the end of the address space.
                let entry = base.wrapping_add(insn.ip().wrapping_sub(base) & !15);
                out.insert(entry, name.clone());
            }
        }
    }
    out
}

fn load_eh(file: &object::File, data: &Arc<[u8]>) -> Option<EhIndex> {
    let sec = file.section_by_name(".eh_frame")?;
    let (off, size) = sec.file_range()?;
    let bytes: Arc<[u8]> = data.get(usize::try_from(off).ok()?..usize::try_from(off.checked_add(size)?).ok()?)?.into();
    let section = EhFrame::from(EndianArcSlice::new(bytes, LittleEndian));
    let mut bases = BaseAddresses::default().set_eh_frame(sec.address());
    if let Some(t) = file.section_by_name(".text") {
        bases = bases.set_text(t.address());
    }
    if let Some(h) = file.section_by_name(".eh_frame_hdr") {
        bases = bases.set_eh_frame_hdr(h.address());
    }
    if let Some(g) = file.section_by_name(".got") {
        bases = bases.set_got(g.address());
    }
    let mut fdes = Vec::new();
    let mut entries = section.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        if let gimli::CieOrFde::Fde(partial) = entry
            && let Ok(fde) = partial.parse(EhFrame::cie_from_offset)
        {
            let start = fde.initial_address();
            if let Some(end) = start.checked_add(fde.len())
                && fde.len() > 0
            {
                fdes.push((start, end, fde));
            }
        }
    }
    fdes.sort_by_key(|(s, _, _)| *s);
    Some(EhIndex { section, bases, fdes, cache: Mutex::new(HashMap::new()) })
}

impl EhIndex {
    fn rule(&self, vaddr: u64) -> Option<FrameRule> {
        let i = self.fdes.partition_point(|(s, _, _)| *s <= vaddr);
        let (_, end, fde) = self.fdes.get(i.checked_sub(1)?)?;
        if vaddr >= *end {
            return None;
        }
        let mut ctx = UnwindContext::new();
        let row = fde.unwind_info_for_address(&self.section, &self.bases, &mut ctx, vaddr).ok()?;
        let (cfa_from_rbp, cfa_offset) = match row.cfa() {
            CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => (false, *offset),
            CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RBP => (true, *offset),
            _ => return None,
        };
        let ra_offset = match row.register(X86_64::RA) {
            Some(RegisterRule::Offset(o)) => Some(o),
            Some(RegisterRule::Undefined) => None,
            None => Some(-8),
            _ => return None,
        };
        let rbp_offset = match row.register(X86_64::RBP) {
            Some(RegisterRule::Offset(o)) => Some(o),
            _ => None,
        };
        Some(FrameRule { cfa_from_rbp, cfa_offset, ra_offset, rbp_offset })
    }
}
