//! Prints how many functions of an ELF file have DWARF signatures, and their parameters:
//! `cargo run -p afetm-elf --example signatures -- <elf>...`
fn main() {
    for arg in std::env::args().skip(1) {
        let path = std::path::Path::new(&arg);
        let module = match afetm_elf::symbols::Module::load(path) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("{arg}: {e}");
                continue;
            }
        };
        let sigs = match afetm_elf::dwarf::signatures(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{arg}: {e}");
                continue;
            }
        };
        let matched: Vec<_> = module.functions().iter().filter_map(|f| sigs.get(&f.start)).collect();
        let params: usize = matched.iter().map(|s| s.params.len()).sum();
        let regs: usize = matched.iter().map(|s| s.register_params().len()).sum();
        let nonvoid = matched.iter().filter(|s| s.returns.is_some()).count();
        let int_ret = matched.iter().filter(|s| s.returns == Some(afetm_elf::dwarf::ValueClass::Integer)).count();
        println!(
            "{}: {} functions, {} with a DWARF signature; {:.2} parameters on average ({} in integer registers); {} non-void ({} integer returns)",
            module.name,
            module.functions().len(),
            matched.len(),
            params as f64 / matched.len().max(1) as f64,
            regs,
            nonvoid,
            int_ret
        );
    }
}
