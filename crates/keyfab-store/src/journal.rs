//! The embedded store's write-ahead journal: each commit's writes appended to a file and
//! made durable with one `fdatasync`, before the commit is acknowledged.
//!
//! Why: a redb commit rewrites every B-tree page it touches and syncs them — for a batch
//! of a few dozen devices that is most of the provisioning engine's serial work. Appending
//! the same writes to a file costs a fraction of it; the writes reach redb later, many
//! commits in one redb transaction (see `embedded`).
//!
//! Byte layout (FORMATS.md, "The embedded store's journal"), integers big-endian:
//!
//! ```text
//! file  := MAGIC (8 bytes) ‖ entry*  ‖ anything (an old use of the file, or zeros)
//! entry := body_len u32 ‖ crc32(body) u32 ‖ body
//! body  := revision u64 ‖ op*
//! op    := 0x01 ‖ key_len u32 ‖ key ‖ value_len u32 ‖ value        (put)
//!        | 0x02 ‖ key_len u32 ‖ key                                 (delete)
//! ```
//!
//! Keys are the backend's full keys (table byte ‖ key). Entries of one file carry
//! consecutive revisions; the file's entries end at the first that is cut short, fails
//! its checksum or does not continue the revisions — what follows is a torn last write or
//! bytes of the file's previous use, never an acknowledged commit.

use crate::{Result, StoreError};

/// The first bytes of every journal file.
pub const MAGIC: &[u8; 8] = b"kfjrnl\x00\x01";

/// The largest entry a reader accepts: a bound on what a damaged length can allocate.
/// Commits bigger than this bypass the journal (see `embedded`).
pub const MAX_ENTRY_BYTES: usize = 64 * 1024 * 1024;

const PUT: u8 = 0x01;
const DELETE: u8 = 0x02;
const ENTRY_HEAD: usize = 8;

/// One write of a journal entry: a value, or `None` for a delete.
pub type Op = (Vec<u8>, Option<Vec<u8>>);

/// One commit as the journal holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub revision: u64,
    pub ops: Vec<Op>,
}

/// One write to encode: the key is `table ‖ key` (the backend's full key).
#[derive(Debug, Clone, Copy)]
pub struct OpRef<'a> {
    pub table: u8,
    pub key: &'a [u8],
    pub value: Option<&'a [u8]>,
}

/// Appends the entry for `revision` with `ops` to `out`.
pub fn encode_into<'a, I>(out: &mut Vec<u8>, revision: u64, ops: I)
where
    I: IntoIterator<Item = OpRef<'a>>,
{
    let start = out.len();
    out.extend_from_slice(&[0u8; ENTRY_HEAD]);
    out.extend_from_slice(&revision.to_be_bytes());
    for OpRef { table, key, value } in ops {
        out.push(if value.is_some() { PUT } else { DELETE });
        out.extend_from_slice(&(key.len() as u32 + 1).to_be_bytes());
        out.push(table);
        out.extend_from_slice(key);
        if let Some(v) = value {
            put_bytes(out, v);
        }
    }
    let body = &out[start + ENTRY_HEAD..];
    let len = body.len() as u32;
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// The entries of a journal file's bytes, in order, up to its end (see the module's
/// doc). A file that does not start with [`MAGIC`], or whose entries stop at a damaged
/// one that a valid continuation follows (an acknowledged commit would be lost), is
/// refused as corrupt.
pub fn parse(file: &[u8]) -> Result<Vec<Entry>> {
    let Some(rest) = file.strip_prefix(MAGIC.as_slice()) else {
        return Err(StoreError::Corrupt("journal file without its magic".into()));
    };
    let mut entries: Vec<Entry> = Vec::new();
    let mut at = 0usize;
    loop {
        let expected = entries.last().map(|e| e.revision.wrapping_add(1));
        match entry_at(rest, at) {
            Some((entry, next)) if expected.is_none_or(|r| r == entry.revision) => {
                entries.push(entry);
                at = next;
            }
            _ => {
                // The end. A damaged entry that a valid next one follows is not a torn
                // last write: refuse rather than drop what came after it.
                if let (Some(expected), Some(skip)) = (expected, claimed_end(rest, at)) {
                    if let Some((after, _)) = entry_at(rest, skip) {
                        if after.revision == expected.wrapping_add(1) {
                            return Err(StoreError::Corrupt(format!(
                                "journal entry of revision {expected} is damaged and later ones follow it"
                            )));
                        }
                    }
                }
                return Ok(entries);
            }
        }
    }
}

/// Where the entry at `at` would end by its length field, whatever its body holds.
fn claimed_end(buf: &[u8], at: usize) -> Option<usize> {
    let len = u32::from_be_bytes(buf.get(at..at + 4)?.try_into().ok()?) as usize;
    at.checked_add(ENTRY_HEAD)?.checked_add(len)
}

/// The valid entry at `at` and the offset after it.
fn entry_at(buf: &[u8], at: usize) -> Option<(Entry, usize)> {
    let head = buf.get(at..at.checked_add(ENTRY_HEAD)?)?;
    let len = u32::from_be_bytes(head[..4].try_into().ok()?) as usize;
    let crc = u32::from_be_bytes(head[4..].try_into().ok()?);
    if !(8..=MAX_ENTRY_BYTES).contains(&len) {
        return None;
    }
    let body = buf.get(at + ENTRY_HEAD..(at + ENTRY_HEAD).checked_add(len)?)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    let entry = decode_body(body)?;
    Some((entry, at + ENTRY_HEAD + len))
}

fn decode_body(body: &[u8]) -> Option<Entry> {
    let revision = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
    let mut ops = Vec::new();
    let mut r = &body[8..];
    while let Some((&kind, rest)) = r.split_first() {
        r = rest;
        let key = take_bytes(&mut r)?;
        let value = match kind {
            PUT => Some(take_bytes(&mut r)?),
            DELETE => None,
            _ => return None,
        };
        ops.push((key, value));
    }
    Some(Entry { revision, ops })
}

fn take_bytes(r: &mut &[u8]) -> Option<Vec<u8>> {
    let len = u32::from_be_bytes(r.get(..4)?.try_into().ok()?) as usize;
    let b = r.get(4..4usize.checked_add(len)?)?.to_vec();
    *r = &r[4 + len..];
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(entries: &[(u64, Vec<Op>)]) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        for (rev, ops) in entries {
            encode_into(
                &mut f,
                *rev,
                ops.iter().map(|(k, v)| OpRef {
                    table: k[0],
                    key: &k[1..],
                    value: v.as_deref(),
                }),
            );
        }
        f
    }

    fn put(k: &[u8], v: &[u8]) -> Op {
        (k.to_vec(), Some(v.to_vec()))
    }

    /// The pinned bytes of FORMATS.md's example: a file with one entry of revision 7
    /// that puts `meta/site` (table byte 0) = "s1" and deletes `\x08k`.
    #[test]
    fn an_entry_has_the_documented_bytes() {
        let f = file_of(&[(7, vec![put(b"\x00site", b"s1"), (b"\x08k".to_vec(), None)])]);
        assert_eq!(
            hex(&f),
            "6b666a726e6c0001\
             0000001f\
             a8bc3fdd\
             0000000000000007\
             01000000050073697465000000027331\
             0200000002086b"
        );
        assert_eq!(
            parse(&f).unwrap(),
            vec![Entry {
                revision: 7,
                ops: vec![put(b"\x00site", b"s1"), (b"\x08k".to_vec(), None)]
            }]
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn a_torn_last_entry_ends_the_journal() {
        let f = file_of(&[(1, vec![put(b"a", b"1")]), (2, vec![put(b"b", b"2")])]);
        for cut in MAGIC.len()..f.len() {
            let got = parse(&f[..cut]).unwrap();
            assert!(got.len() <= 1, "cut at {cut}");
        }
        assert_eq!(parse(&f).unwrap().len(), 2);
    }

    #[test]
    fn stale_entries_of_an_earlier_use_are_not_read() {
        // The file held revisions 1..=3; reused, it now holds 10 over the first of them.
        let old = file_of(&[
            (1, vec![put(b"a", b"1")]),
            (2, vec![put(b"b", b"2")]),
            (3, vec![put(b"c", b"3")]),
        ]);
        let new = file_of(&[(10, vec![put(b"a", b"x")])]);
        let mut f = old.clone();
        f[..new.len()].copy_from_slice(&new);
        let got = parse(&f).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].revision, 10);
    }

    #[test]
    fn a_damaged_entry_that_later_ones_follow_is_corrupt() {
        let mut f = file_of(&[
            (1, vec![put(b"a", b"1")]),
            (2, vec![put(b"b", b"2")]),
            (3, vec![put(b"c", b"3")]),
        ]);
        // Flip a byte of the second entry's value.
        let at = f.len() - 1 - (f.len() - MAGIC.len()) / 3;
        f[at] ^= 0xff;
        assert!(matches!(parse(&f), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn a_file_without_the_magic_is_corrupt() {
        assert!(parse(b"").is_err());
        assert!(parse(b"not a journal").is_err());
        assert_eq!(parse(MAGIC).unwrap(), vec![]);
    }
}
