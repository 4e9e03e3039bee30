//! Reading executables and libraries from outside: ELF files (`elf`), x86-64
//! machine code (`x86`) and Go executables (`golang`). Shared by every
//! tracker that plans probes or reads a Go program; knows no tracker.

pub mod debug_file;
pub mod golang;
pub mod elf;
pub mod x86;
