//! Reading executables and libraries from outside: ELF files (`elf`), x86-64
//! machine code (`x86`), Go executables (`golang`), separate debug files
//! (`debug_file`), a HotSpot JVM's self-description (`hotspot`) and the
//! kernel's BTF (`btf`). Shared by every tracker that plans probes or reads
//! a Go program; knows no tracker.

pub mod btf;
pub mod debug_file;
pub mod golang;
pub mod hotspot;
pub mod elf;
pub mod x86;
