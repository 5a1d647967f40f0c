//! Function signatures from DWARF (gimli), for the fault campaign's interface faults (AFETM
//! sec. IV.A): one input corruption per parameter, one output corruption per non-void
//! function. Only out-of-line definitions count (a `DW_TAG_subprogram` with `DW_AT_low_pc`, or
//! `DW_AT_ranges` whose first range is the entry of a function split into hot and `.cold`
//! parts), keyed by that address so they match [`crate::symbols::Function::start`]; names, types and
//! parameters of `-O2` code often live in an abstract origin or a declaration, which are
//! followed.
//!
//! Binaries without `.debug_info` give no signatures; the campaign then injects only the
//! faults that need none (crash, deadlock, IP+N) and says so.

use std::{borrow::Cow, collections::HashMap, path::Path};

use gimli::{AttributeValue, EndianSlice, RunTimeEndian, UnitOffset};
use object::{Object, ObjectSection};

#[derive(Debug, thiserror::Error)]
pub enum DwarfError {
    #[error("reading {0}: {1}")]
    Io(String, std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(String, object::Error),
    #[error("DWARF in {0}: {1}")]
    Dwarf(String, gimli::Error),
}

/// How a value is passed on x86-64 (System V).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueClass {
    /// Integers, pointers, enums, bools: general purpose registers.
    Integer,
    /// float/double: xmm registers.
    Float,
    /// Structs, unions, arrays passed by value, or a type DWARF does not describe.
    Other,
}

/// A function's parameters and return value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub name: String,
    pub params: Vec<ValueClass>,
    /// `None` for void.
    pub returns: Option<ValueClass>,
}

impl Signature {
    /// Parameters in general purpose registers, as (parameter index, register index 0..6 =
    /// rdi, rsi, rdx, rcx, r8, r9). Counting stops at the first parameter whose class is
    /// `Other` (its register use depends on its layout).
    pub fn register_params(&self) -> Vec<(usize, u32)> {
        let mut out = Vec::new();
        let mut reg = 0u32;
        for (i, c) in self.params.iter().enumerate() {
            match c {
                ValueClass::Integer if reg < 6 => {
                    out.push((i, reg));
                    reg += 1;
                }
                ValueClass::Integer | ValueClass::Float => {}
                ValueClass::Other => break,
            }
        }
        out
    }
}

impl Signature {
    /// Integer parameters passed on the stack (the seventh integer parameter on), as
    /// (parameter index, stack slot above the return address). Stops at the first `Other`
    /// parameter and once floats spill past the eight xmm registers (their slots interleave).
    pub fn stack_params(&self) -> Vec<(usize, u32)> {
        let (mut ints, mut floats, mut slot) = (0u32, 0u32, 0u32);
        let mut out = Vec::new();
        for (i, c) in self.params.iter().enumerate() {
            match c {
                ValueClass::Integer => {
                    ints += 1;
                    if ints > 6 {
                        out.push((i, slot));
                        slot += 1;
                    }
                }
                ValueClass::Float => {
                    floats += 1;
                    if floats > 8 {
                        break;
                    }
                }
                ValueClass::Other => break,
            }
        }
        out
    }
}

type R<'a> = EndianSlice<'a, RunTimeEndian>;

/// Signatures of the functions defined in `path`, by entry address.
pub fn signatures(path: &Path) -> Result<HashMap<u64, Signature>, DwarfError> {
    let p = path.display().to_string();
    let data = std::fs::read(path).map_err(|e| DwarfError::Io(p.clone(), e))?;
    signatures_in(&p, &data)
}

/// Signatures of the functions defined in the ELF file `data`; `p` names it in errors.
pub fn signatures_in(p: &str, data: &[u8]) -> Result<HashMap<u64, Signature>, DwarfError> {
    let p = p.to_string();
    let file = object::File::parse(&*data).map_err(|e| DwarfError::Parse(p.clone(), e))?;
    let endian = if file.is_little_endian() { RunTimeEndian::Little } else { RunTimeEndian::Big };
    let sections = gimli::DwarfSections::load(|id| -> Result<Cow<[u8]>, gimli::Error> {
        Ok(file.section_by_name(id.name()).and_then(|s| s.uncompressed_data().ok()).unwrap_or(Cow::Borrowed(&[])))
    })
    .map_err(|e| DwarfError::Dwarf(p.clone(), e))?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, endian));
    let mut out = HashMap::new();
    let mut units = dwarf.units();
    while let Some(header) = units.next().map_err(|e| DwarfError::Dwarf(p.clone(), e))? {
        let unit = dwarf.unit(header).map_err(|e| DwarfError::Dwarf(p.clone(), e))?;
        read_unit(&dwarf, &unit, &mut out).map_err(|e| DwarfError::Dwarf(p.clone(), e))?;
    }
    Ok(out)
}

fn read_unit(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    out: &mut HashMap<u64, Signature>,
) -> Result<(), gimli::Error> {
    let mut entries = unit.entries();
    while let Some(entry) = entries.next_dfs()? {
        if entry.tag() != gimli::DW_TAG_subprogram {
            continue;
        }
        // The entry: DW_AT_low_pc, or the first of DW_AT_ranges (hot part before a .cold split).
        let low_pc = match entry.attr_value(gimli::DW_AT_low_pc) {
            Some(AttributeValue::Addr(a)) => a,
            _ if entry.attr_value(gimli::DW_AT_ranges).is_some() => match dwarf.die_ranges(unit, entry)?.next()? {
                Some(r) => r.begin,
                None => continue,
            },
            _ => continue,
        };
        let off = entry.offset();
        let Some(name) = find_name(dwarf, unit, off, 0)? else {
            continue;
        };
        let returns = match find_attr(unit, off, gimli::DW_AT_type, 0)? {
            Some(AttributeValue::UnitRef(t)) => Some(classify(unit, t, 0)?),
            _ => None,
        };
        let params = params_of(unit, off, 0)?;
        out.insert(low_pc, Signature { name, params, returns });
    }
    Ok(())
}

/// The DIE this one continues (`DW_AT_abstract_origin` or `DW_AT_specification`), in this unit.
fn origin(unit: &gimli::Unit<R<'_>>, off: UnitOffset) -> Result<Option<UnitOffset>, gimli::Error> {
    let e = unit.entry(off)?;
    for at in [gimli::DW_AT_abstract_origin, gimli::DW_AT_specification] {
        if let Some(AttributeValue::UnitRef(o)) = e.attr_value(at) {
            return Ok(Some(o));
        }
    }
    Ok(None)
}

fn find_attr<'a>(
    unit: &gimli::Unit<R<'a>>,
    off: UnitOffset,
    at: gimli::DwAt,
    depth: u32,
) -> Result<Option<AttributeValue<R<'a>>>, gimli::Error> {
    if depth > 4 {
        return Ok(None);
    }
    if let Some(v) = unit.entry(off)?.attr_value(at) {
        return Ok(Some(v));
    }
    match origin(unit, off)? {
        Some(o) => find_attr(unit, o, at, depth + 1),
        None => Ok(None),
    }
}

fn find_name(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &gimli::Unit<R<'_>>,
    off: UnitOffset,
    depth: u32,
) -> Result<Option<String>, gimli::Error> {
    match find_attr(unit, off, gimli::DW_AT_name, depth)? {
        Some(v) => Ok(Some(dwarf.attr_string(unit, v)?.to_string_lossy().into_owned())),
        None => Ok(None),
    }
}

/// Classes of the formal parameters of the subprogram at `off` (or of its origin).
fn params_of(unit: &gimli::Unit<R<'_>>, off: UnitOffset, depth: u32) -> Result<Vec<ValueClass>, gimli::Error> {
    let mut tree = unit.entries_tree(Some(off))?;
    let root = tree.root()?;
    let mut children = root.children();
    let mut params = Vec::new();
    while let Some(child) = children.next()? {
        let e = child.entry();
        if e.tag() != gimli::DW_TAG_formal_parameter {
            continue;
        }
        let class = match find_attr(unit, e.offset(), gimli::DW_AT_type, 0)? {
            Some(AttributeValue::UnitRef(t)) => classify(unit, t, 0)?,
            _ => ValueClass::Other,
        };
        params.push(class);
    }
    if params.is_empty()
        && depth < 4
        && let Some(o) = origin(unit, off)?
    {
        return params_of(unit, o, depth + 1);
    }
    Ok(params)
}

fn classify(unit: &gimli::Unit<R<'_>>, off: UnitOffset, depth: u32) -> Result<ValueClass, gimli::Error> {
    if depth > 16 {
        return Ok(ValueClass::Other);
    }
    let e = unit.entry(off)?;
    Ok(match e.tag() {
        gimli::DW_TAG_pointer_type
        | gimli::DW_TAG_reference_type
        | gimli::DW_TAG_rvalue_reference_type
        | gimli::DW_TAG_enumeration_type => ValueClass::Integer,
        gimli::DW_TAG_base_type => match e.attr_value(gimli::DW_AT_encoding) {
            Some(AttributeValue::Encoding(enc)) if enc == gimli::DW_ATE_float || enc == gimli::DW_ATE_complex_float => {
                ValueClass::Float
            }
            Some(AttributeValue::Encoding(_)) => {
                match e.attr_value(gimli::DW_AT_byte_size).and_then(|v| v.udata_value()) {
                    Some(n) if n <= 8 => ValueClass::Integer,
                    _ => ValueClass::Other,
                }
            }
            _ => ValueClass::Other,
        },
        gimli::DW_TAG_typedef
        | gimli::DW_TAG_const_type
        | gimli::DW_TAG_volatile_type
        | gimli::DW_TAG_restrict_type
        | gimli::DW_TAG_atomic_type => match e.attr_value(gimli::DW_AT_type) {
            Some(AttributeValue::UnitRef(t)) => classify(unit, t, depth + 1)?,
            _ => ValueClass::Other, // const void etc.
        },
        _ => ValueClass::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_params_skip_floats_and_stop_at_aggregates() {
        use ValueClass::*;
        let s = Signature { name: "f".into(), params: vec![Integer, Float, Integer, Other, Integer], returns: None };
        assert_eq!(s.register_params(), vec![(0, 0), (2, 1)]);
        let many = Signature { name: "g".into(), params: vec![Integer; 8], returns: Some(Integer) };
        assert_eq!(many.register_params().len(), 6);
        assert_eq!(many.stack_params(), vec![(6, 0), (7, 1)]);
        let mixed = Signature {
            name: "h".into(),
            params: vec![Integer, Float, Integer, Integer, Integer, Integer, Integer, Integer],
            returns: None,
        };
        assert_eq!(mixed.stack_params(), vec![(7, 0)], "the double does not take an integer register");
    }
}
