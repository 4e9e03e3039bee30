//! The Go binary readers against every Go fixture build (no root needed):
//! the version table equals the DWARF offsets of each unstripped build,
//! and what a stripped build gets by disassembly (runtime.allgs,
//! runtime.waitReasonStrings) equals the symbol table.

mod common;

use leaktrace::binary::golang::{offsets, Found, GoRuntime, GoSymbols};
use object::{Object, ObjectSymbol};

/// Every Go fixture binary built with every toolchain.
const BUILDS: &[(&str, u32)] = &[
    ("goroutineleak", 19),
    ("goroutineleak122", 22),
    ("goroutineleak124", 24),
    ("goroutineleak125", 25),
    ("goroutineleak127", 27),
    ("connleak-go", 19),
    ("connleak-go122", 22),
    ("connleak-go124", 24),
    ("connleak-go125", 25),
    ("connleak-go127", 27),
];

fn symbol(data: &[u8], name: &str) -> (u64, u64) {
    let elf = object::File::parse(data).unwrap();
    let s = elf.symbols().find(|s| s.name() == Ok(name)).unwrap_or_else(|| panic!("no {name}"));
    (s.address(), s.size())
}

#[test]
fn version_tables_equal_the_dwarf_of_every_build() {
    for (name, minor) in BUILDS {
        let data = std::fs::read(common::fixture(name)).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        let bin = GoRuntime::parse(&data).unwrap().unwrap();
        assert_eq!(bin.version.minor, *minor, "{name}: {}", bin.version_string);
        assert_eq!(bin.offsets_source, offsets::Source::Dwarf, "{name}");
        let dwarf = offsets::from_dwarf(&elf).unwrap().unwrap();
        assert_eq!(offsets::table(bin.version), Some(dwarf), "{name} ({}): table differs from DWARF", bin.version_string);
    }
}

#[test]
fn disassembly_finds_what_the_symbol_table_says() {
    for (name, _) in BUILDS {
        let data = std::fs::read(common::fixture(name)).unwrap();
        let bin = GoRuntime::parse(&data).unwrap().unwrap();
        assert_eq!(bin.allgs_source, Found::Symtab);
        let elf = object::File::parse(&*data).unwrap();
        let syms = GoSymbols::from_elf(&elf).unwrap().unwrap();
        assert_eq!(
            leaktrace::binary::golang::allgs_by_disassembly(&elf, &syms).unwrap(),
            symbol(&data, "runtime.allgs").0,
            "{name}: runtime.allgs"
        );
        let (addr, size) = symbol(&data, "runtime.waitReasonStrings");
        assert_eq!(leaktrace::binary::golang::wait_reasons_by_disassembly(&data, &elf, &syms), Some((addr, size / 16)), "{name}");
        assert_eq!(bin.wait_reasons, Some((addr, size / 16)));
    }
}

#[test]
fn pclntab_names_functions_like_the_symbol_table() {
    for (name, _) in BUILDS {
        let data = std::fs::read(common::fixture(name)).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        let syms = GoSymbols::from_elf(&elf).unwrap().unwrap();
        let mut checked = 0;
        for s in elf.symbols().filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 0) {
            let Ok(n) = s.name() else { continue };
            if !(n.starts_with("main.") || n.starts_with("runtime.g")) {
                continue;
            }
            let info = syms.pclntab.lookup(s.address() + s.size() / 2).unwrap_or_else(|| panic!("{name}: {n}"));
            assert_eq!(info.function, n.trim_end_matches(".abi0"), "{name}");
            assert_eq!(info.entry, s.address(), "{name}: {n}");
            checked += 1;
        }
        assert!(checked > 20, "{name}: only {checked} functions");
        // file:line of a known line: the `go` statement in NewSession.
        if name.starts_with("goroutineleak") {
            let (addr, size) = symbol(&data, "main.NewSession");
            let lines: Vec<_> = (addr..addr + size).filter_map(|pc| syms.pclntab.lookup(pc)).collect();
            assert!(lines.iter().all(|l| l.file.as_deref().is_some_and(|f| f.ends_with("goroutineleak/main.go"))), "{name}");
            let go_line = include_str!("../../fixtures/go/goroutineleak/main.go")
                .lines()
                .position(|l| l.trim() == "go s.keepAlive()")
                .unwrap() as u32
                + 1;
            assert!(lines.iter().any(|l| l.line == Some(go_line)), "{name}: no pc on line {go_line}");
        }
    }
}

#[test]
fn the_stripped_build_gets_everything_without_symbols() {
    let data = std::fs::read(common::fixture("goroutineleak127-stripped")).unwrap();
    let full = GoRuntime::parse(&std::fs::read(common::fixture("goroutineleak127")).unwrap()).unwrap().unwrap();
    let bin = GoRuntime::parse(&data).unwrap().unwrap();
    assert_eq!(bin.version.minor, 27);
    assert_eq!(bin.offsets_source, offsets::Source::Table);
    assert_eq!(bin.offsets, full.offsets);
    assert_eq!(bin.allgs_source, Found::Disassembly);
    assert_eq!(bin.allgs, full.allgs);
    assert_eq!(bin.wait_reasons, full.wait_reasons);
    assert!(bin.symbols.pclntab.function_range("main.NewSession").is_some());
}

#[test]
fn non_go_binaries_are_not_go() {
    let data = std::fs::read(common::fixture("thread_leak")).unwrap();
    assert!(GoRuntime::parse(&data).unwrap().is_none());
}

