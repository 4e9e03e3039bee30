//! The running kernel's BTF (`/sys/kernel/btf/vmlinux`), read for the few
//! struct member offsets the kernel side needs but cannot find itself
//! (aya-ebpf has no CO-RE field access): `task_struct.thread.fsbase` for
//! the Java walker's TLS read. A plain reader of the documented format.

use anyhow::{anyhow, bail, Context, Result};

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One type: its kind, name, the type it refers to (typedefs, modifiers)
/// and, for structs and unions, its members (name offset, type, bit offset).
struct Type {
    kind: u32,
    name: u32,
    refers: u32,
    members: Vec<(u32, u32, u32)>,
}

/// A parsed BTF blob (types by id, 1-based; strings).
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(d: &[u8], at: usize) -> Result<u32> {
    d.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).ok_or_else(|| anyhow!("BTF truncated at {at}"))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Self> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
        Self::parse(&data).with_context(|| path.to_string())
    }

    pub fn parse(d: &[u8]) -> Result<Self> {
        if d.get(0..2) != Some(&[0x9f, 0xeb]) {
            bail!("not little-endian BTF");
        }
        let hdr_len = u32_at(d, 4)? as usize;
        let (type_off, type_len) = (u32_at(d, 8)? as usize, u32_at(d, 12)? as usize);
        let (str_off, str_len) = (u32_at(d, 16)? as usize, u32_at(d, 20)? as usize);
        let types_data = d.get(hdr_len + type_off..hdr_len + type_off + type_len).ok_or_else(|| anyhow!("type section out of bounds"))?;
        let strings = d.get(hdr_len + str_off..hdr_len + str_off + str_len).ok_or_else(|| anyhow!("string section out of bounds"))?.to_vec();
        let mut types = Vec::new();
        let mut at = 0usize;
        while at + 12 <= types_data.len() {
            let (name, info, refers) = (u32_at(types_data, at)?, u32_at(types_data, at + 4)?, u32_at(types_data, at + 8)?);
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            at += match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + 12 * i;
                        let off = u32_at(types_data, m + 8)?;
                        members.push((u32_at(types_data, m)?, u32_at(types_data, m + 4)?, if kind_flag { off & 0xff_ffff } else { off }));
                    }
                    12 * vlen
                }
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                _ => 0,
            };
            types.push(Type { kind, name, refers, members });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn get(&self, id: u32) -> Option<&Type> {
        id.checked_sub(1).and_then(|i| self.types.get(i as usize))
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..16 {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = t.refers,
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in struct/union `t`, looking into anonymous
    /// members; with the member's type id.
    fn member(&self, t: &Type, member: &str, depth: u32) -> Option<(u64, u32)> {
        for &(name, ty, bits) in &t.members {
            if self.name(name) == member {
                return Some((bits as u64 / 8, ty));
            }
        }
        if depth > 4 {
            return None;
        }
        for &(name, ty, bits) in &t.members {
            if name == 0 {
                if let Some(inner) = self.resolve(ty).filter(|i| i.kind == KIND_STRUCT || i.kind == KIND_UNION) {
                    if let Some((off, ty)) = self.member(inner, member, depth + 1) {
                        return Some((bits as u64 / 8 + off, ty));
                    }
                }
            }
        }
        None
    }

    /// Offset of `path` (`["thread", "fsbase"]`) in struct `name`.
    pub fn offset_of(&self, name: &str, path: &[&str]) -> Result<u64> {
        let mut t = self
            .types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name) == name)
            .ok_or_else(|| anyhow!("no struct {name} in the kernel's BTF"))?;
        let mut total = 0;
        for (i, m) in path.iter().enumerate() {
            let (off, ty) = self.member(t, m, 0).ok_or_else(|| anyhow!("no {name}.{} in the kernel's BTF", path[..=i].join(".")))?;
            total += off;
            if i + 1 < path.len() {
                t = self.resolve(ty).ok_or_else(|| anyhow!("bad BTF type {ty}"))?;
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's kernel: `task_struct.thread.fsbase` is found, inside
    /// the struct and 8-aligned.
    #[test]
    fn kernel_task_fsbase() {
        let Ok(btf) = Btf::kernel() else { return };
        let off = btf.offset_of("task_struct", &["thread", "fsbase"]).unwrap();
        let thread = btf.offset_of("task_struct", &["thread"]).unwrap();
        assert!(off > thread && off % 8 == 0, "{off} {thread}");
    }
}
