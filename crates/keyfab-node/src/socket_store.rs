//! The store of a serving site, lent to the site's own commands through `HOME/serve.sock`.
//!
//! While `keyfab site serve` runs on a home with the embedded store, it holds
//! `HOME/state.redb` (one process at a time). Every other `keyfab site …` command then
//! opens the home as usual — it unlocks the keystore itself, with the same passphrase or
//! shares — and reaches the same store through the socket: [`Node::open`] finds the
//! store busy and the socket answering, proves it holds the site's cluster key, and
//! gets a [`SocketStore`]. The command runs its own code unchanged (its files, its
//! output and its exit code are its own); only its reads and commits go to the server's
//! store, where `site serve`'s own commits land between them — as other nodes' do on
//! etcd — so both sides guard what they read and read again when a guard fails.
//!
//! Protocol (one connection per session, same user: the socket is mode 0600). Every
//! message is a frame: a 4-byte big-endian length, then that many bytes of CBOR.
//! 1. client: [`Opening::Store`]; server: [`Answer::Ok`] of a 32-byte challenge;
//! 2. client: the signature ([`proof_message`]) by the site's cluster key; server:
//!    [`Answer::Ok`] (or an error, and it closes);
//! 3. then any number of [`StoreCall`]s, each answered by one [`StoreReply`] in an
//!    [`Answer`], until the client closes.
//!
//! The same socket takes the server's own administrative requests ([`Opening::Admin`]:
//! status, and unseal shares while the site is sealed), one per connection.
//!
//! [`Node::open`]: crate::Node::open

use keyfab_store::{
    CommitLimits, Guard, Outcome, Purged, Store, StoreError, Table, Txn, Versioned, Write,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::io::{Read, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;

/// The socket's file name in a site's home.
pub const SOCKET: &str = "serve.sock";

/// The largest frame a server reads from a client: a commit of imported pool rows is
/// the largest message (at most [`SOCKET_COMMIT_LIMITS`]).
pub const MAX_CLIENT_FRAME: u32 = 32 << 20;

/// The largest frame a client reads from the server (a scan of a long table).
const MAX_SERVER_FRAME: u32 = 1 << 30;

/// What one commit through the socket may carry.
pub const SOCKET_COMMIT_LIMITS: CommitLimits = CommitLimits {
    max_writes: 65_536,
    max_bytes: 16 << 20,
    max_guards: 65_536,
};

/// How a connection to the socket starts.
#[derive(Debug, Serialize, Deserialize)]
pub enum Opening<A> {
    /// A store session (see the module's protocol).
    Store,
    /// One administrative request of the server's own (`A`), answered once.
    Admin(A),
}

/// Every answer on the socket.
#[derive(Debug, Serialize, Deserialize)]
pub enum Answer<T> {
    /// What was asked.
    Ok(T),
    /// Refused: the stable code (docs: error codes) and the message.
    Err {
        /// The error's stable code.
        code: String,
        /// What went wrong.
        message: String,
    },
}

/// What the client signs to open a store session: a fixed context, then the server's
/// challenge.
pub fn proof_message(challenge: &[u8]) -> Vec<u8> {
    let mut m = b"keyfab serve.sock store session v1\0".to_vec();
    m.extend_from_slice(challenge);
    m
}

/// One store operation through the socket.
#[derive(Debug, Serialize, Deserialize)]
pub enum StoreCall {
    /// [`Store::get_many`] (one snapshot); a single get is a list of one.
    Get(Vec<(u8, ByteBuf)>),
    /// [`Store::scan_from`].
    Scan {
        /// The table's byte ([`Table::byte`]).
        table: u8,
        /// Keys start with it.
        prefix: ByteBuf,
        /// Keys are not before it.
        from: ByteBuf,
        /// At most this many.
        limit: u64,
    },
    /// [`Store::commit`].
    Commit {
        /// The guards, in order.
        guards: Vec<WireGuard>,
        /// The writes, in order.
        writes: Vec<WireWrite>,
        /// [`Txn::non_durable`].
        lazy: bool,
    },
    /// [`Store::revision`].
    Revision,
    /// [`Store::purge_deleted`].
    PurgeDeleted,
    /// [`Store::hold_writers`]: the server's writer waits until `Release`, the end of
    /// the session, or [`HOLD_MAX`].
    Hold,
    /// [`Store::release_writers`].
    Release,
}

/// Longest a session may hold the server's writer back: past it, the line goes on.
pub const HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// A [`Guard`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum WireGuard {
    /// [`Guard::Absent`].
    Absent(u8, ByteBuf),
    /// [`Guard::AtRevision`].
    AtRevision(u8, ByteBuf, u64),
    /// [`Guard::AbsentRange`].
    AbsentRange(u8, ByteBuf, ByteBuf),
}

/// A [`Write`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum WireWrite {
    /// [`Write::Put`].
    Put(u8, ByteBuf, ByteBuf),
    /// [`Write::Delete`].
    Delete(u8, ByteBuf),
    /// [`Write::DeletePrefix`].
    DeletePrefix(u8, ByteBuf),
    /// [`Write::DeleteRange`].
    DeleteRange(u8, ByteBuf, ByteBuf),
}

/// The answer to a [`StoreCall`].
#[derive(Debug, Serialize, Deserialize)]
pub enum StoreReply {
    /// Values and their revisions, in the order asked.
    Values(Vec<Option<(ByteBuf, u64)>>),
    /// Keys, values and revisions, in key order.
    Entries(Vec<(ByteBuf, ByteBuf, u64)>),
    /// Committed at this revision, or `None`: a guard failed and nothing was written.
    Committed(Option<u64>),
    /// The store's revision.
    Revision(u64),
    /// Whether the server's writer is held back now.
    Held(bool),
    /// What a purge did: bytes rewritten, or the revision compacted to, or neither.
    Purged {
        /// [`Purged::Rewritten`].
        rewritten: Option<u64>,
        /// [`Purged::Compacted`].
        compacted: Option<u64>,
    },
    /// The store failed: [`StoreError`]'s kind (`io`, `corrupt`, `busy`,
    /// `indeterminate`) and its message.
    Failed {
        /// Which [`StoreError`].
        kind: String,
        /// Its message.
        message: String,
    },
}

/// A message as a frame: its length (4 bytes, big-endian), then its CBOR.
pub fn frame<T: Serialize>(message: &T) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    // Writing into a Vec does not fail; a value serde cannot encode is a bug caught in
    // tests, and an empty body is refused by the reader.
    let _ = ciborium::into_writer(message, &mut out);
    let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// A frame's body, decoded.
pub fn unframe<T: serde::de::DeserializeOwned>(body: &[u8]) -> std::io::Result<T> {
    ciborium::from_reader(body).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("serve.sock message: {e}"),
        )
    })
}

/// Reads one frame's body (at most `max` bytes) from a blocking stream.
pub fn read_frame(
    stream: &mut impl Read,
    max: u32,
) -> std::io::Result<zeroize::Zeroizing<Vec<u8>>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("serve.sock message of {len} bytes (at most {max})"),
        ));
    }
    let mut body = zeroize::Zeroizing::new(vec![0u8; len as usize]);
    stream.read_exact(&mut body)?;
    Ok(body)
}

fn table_of(byte: u8) -> Result<Table, StoreError> {
    Table::ALL
        .get(usize::from(byte))
        .copied()
        .ok_or_else(|| StoreError::Io(format!("serve.sock: no table {byte}")))
}

fn bytes(b: &[u8]) -> ByteBuf {
    ByteBuf::from(b.to_vec())
}

impl StoreCall {
    /// The call that commits `txn`.
    pub fn commit(txn: &Txn) -> Self {
        let guards = txn
            .guards()
            .iter()
            .map(|g| match g {
                Guard::Absent(t, k) => WireGuard::Absent(t.byte(), bytes(k)),
                Guard::AtRevision(t, k, r) => WireGuard::AtRevision(t.byte(), bytes(k), *r),
                Guard::AbsentRange(t, a, b) => WireGuard::AbsentRange(t.byte(), bytes(a), bytes(b)),
            })
            .collect();
        let writes = txn
            .writes()
            .iter()
            .map(|w| match w {
                Write::Put(t, k, v) => WireWrite::Put(t.byte(), bytes(k), bytes(v)),
                Write::Delete(t, k) => WireWrite::Delete(t.byte(), bytes(k)),
                Write::DeletePrefix(t, p) => WireWrite::DeletePrefix(t.byte(), bytes(p)),
                Write::DeleteRange(t, a, b) => WireWrite::DeleteRange(t.byte(), bytes(a), bytes(b)),
            })
            .collect();
        StoreCall::Commit {
            guards,
            writes,
            lazy: txn.is_lazy(),
        }
    }

    /// Runs the call on `store` (the server's side). A session keeps track of its own
    /// hold: `Hold` takes the store's gate here, the session releases it.
    pub fn run(self, store: &dyn Store) -> StoreReply {
        self.run_checked(store).unwrap_or_else(|e| {
            let kind = match &e {
                StoreError::Io(_) => "io",
                StoreError::Corrupt(_) => "corrupt",
                StoreError::Busy => "busy",
                StoreError::Indeterminate(_) => "indeterminate",
            };
            let message = match e {
                StoreError::Io(m) | StoreError::Corrupt(m) | StoreError::Indeterminate(m) => m,
                StoreError::Busy => String::new(),
            };
            StoreReply::Failed {
                kind: kind.into(),
                message,
            }
        })
    }

    fn run_checked(self, store: &dyn Store) -> Result<StoreReply, StoreError> {
        let versioned = |v: Versioned| (ByteBuf::from(v.value), v.revision);
        Ok(match self {
            StoreCall::Get(keys) => {
                let keys = keys
                    .iter()
                    .map(|(t, k)| Ok((table_of(*t)?, k.as_slice())))
                    .collect::<Result<Vec<_>, StoreError>>()?;
                StoreReply::Values(
                    store
                        .get_many(&keys)?
                        .into_iter()
                        .map(|v| v.map(versioned))
                        .collect(),
                )
            }
            StoreCall::Scan {
                table,
                prefix,
                from,
                limit,
            } => {
                let limit = usize::try_from(limit).unwrap_or(usize::MAX);
                StoreReply::Entries(
                    store
                        .scan_from(table_of(table)?, &prefix, &from, limit)?
                        .into_iter()
                        .map(|(k, v)| (ByteBuf::from(k), ByteBuf::from(v.value), v.revision))
                        .collect(),
                )
            }
            StoreCall::Commit {
                guards,
                writes,
                lazy,
            } => {
                let mut txn = Txn::default();
                for g in guards {
                    match g {
                        WireGuard::Absent(t, k) => txn.require_absent(table_of(t)?, &k),
                        WireGuard::AtRevision(t, k, r) => {
                            txn.require_revision(table_of(t)?, &k, Some(r))
                        }
                        WireGuard::AbsentRange(t, a, b) => {
                            txn.require_absent_range(table_of(t)?, &a, &b)
                        }
                    };
                }
                for w in writes {
                    match w {
                        WireWrite::Put(t, k, v) => {
                            txn.put_owned(table_of(t)?, k.into_vec(), v.into_vec())
                        }
                        WireWrite::Delete(t, k) => txn.delete(table_of(t)?, &k),
                        WireWrite::DeletePrefix(t, p) => txn.delete_prefix(table_of(t)?, &p),
                        WireWrite::DeleteRange(t, a, b) => txn.delete_range(table_of(t)?, &a, &b),
                    };
                }
                if lazy {
                    txn.non_durable();
                }
                StoreReply::Committed(match store.commit(txn)? {
                    Outcome::Committed(r) => Some(r),
                    Outcome::Conflict => None,
                })
            }
            StoreCall::Revision => StoreReply::Revision(store.revision()?),
            StoreCall::Hold => {
                StoreReply::Held(store.writers_gate().is_some_and(|gate| gate.hold(HOLD_MAX)))
            }
            // The session that holds the gate releases it (it alone knows it holds it).
            StoreCall::Release => StoreReply::Held(false),
            StoreCall::PurgeDeleted => match store.purge_deleted()? {
                Purged::Rewritten { bytes } => StoreReply::Purged {
                    rewritten: Some(bytes),
                    compacted: None,
                },
                Purged::Compacted { revision } => StoreReply::Purged {
                    rewritten: None,
                    compacted: Some(revision),
                },
                Purged::NotNeeded => StoreReply::Purged {
                    rewritten: None,
                    compacted: None,
                },
            },
        })
    }
}

/// The store of the `site serve` running on a home, reached through its socket.
pub struct SocketStore {
    stream: Mutex<UnixStream>,
    sent: std::sync::atomic::AtomicU64,
}

/// Why the socket could not be used, for messages.
fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("site serve (HOME/{SOCKET}): {e}"))
}

impl SocketStore {
    /// Connects to the `site serve` of `home` and opens a store session, proving with
    /// `cluster_key` (the site's cluster key, from the keystore the caller unlocked)
    /// that it may. `None` when no server answers on the socket.
    pub fn connect(
        home: &Path,
        cluster_key: &dyn keyfab_crypto::sign::EcdsaSigner,
    ) -> Option<Result<Self, crate::Error>> {
        let mut stream = UnixStream::connect(home.join(SOCKET)).ok()?;
        Some(Self::open_session(&mut stream, cluster_key).map(|()| Self {
            stream: Mutex::new(stream),
            sent: Default::default(),
        }))
    }

    fn open_session(
        stream: &mut UnixStream,
        cluster_key: &dyn keyfab_crypto::sign::EcdsaSigner,
    ) -> Result<(), crate::Error> {
        stream.write_all(&frame(&Opening::<()>::Store))?;
        let challenge: ByteBuf = answer_of(stream)?;
        let signature = cluster_key.sign(&proof_message(&challenge))?;
        stream.write_all(&frame(&ByteBuf::from(signature)))?;
        answer_of::<()>(stream)
    }

    fn call(&self, call: &StoreCall) -> Result<StoreReply, StoreError> {
        let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        stream.write_all(&frame(call)).map_err(io)?;
        let body = read_frame(&mut *stream, MAX_SERVER_FRAME).map_err(io)?;
        match unframe::<StoreReply>(&body).map_err(io)? {
            StoreReply::Failed { kind, message } => Err(match kind.as_str() {
                "corrupt" => StoreError::Corrupt(message),
                "busy" => StoreError::Busy,
                "indeterminate" => StoreError::Indeterminate(message),
                _ => StoreError::Io(message),
            }),
            reply => Ok(reply),
        }
    }
}

/// Reads one [`Answer`] from the server: its value, or its refusal as an error.
pub fn answer_of<T: serde::de::DeserializeOwned>(
    stream: &mut impl Read,
) -> Result<T, crate::Error> {
    let body = read_frame(stream, MAX_SERVER_FRAME)?;
    match unframe::<Answer<T>>(&body)? {
        Answer::Ok(v) => Ok(v),
        Answer::Err { code, message } => Err(crate::Error::Relayed {
            code: crate::Code::parse(&code).unwrap_or(crate::Code::Internal),
            message,
        }),
    }
}

fn unexpected(reply: StoreReply) -> StoreError {
    StoreError::Io(format!("site serve answered out of turn: {reply:?}"))
}

impl Store for SocketStore {
    fn get(&self, table: Table, key: &[u8]) -> keyfab_store::Result<Option<Versioned>> {
        Ok(self.get_many(&[(table, key)])?.pop().flatten())
    }

    fn get_many(&self, keys: &[(Table, &[u8])]) -> keyfab_store::Result<Vec<Option<Versioned>>> {
        let call = StoreCall::Get(keys.iter().map(|(t, k)| (t.byte(), bytes(k))).collect());
        match self.call(&call)? {
            StoreReply::Values(values) if values.len() == keys.len() => Ok(values
                .into_iter()
                .map(|v| {
                    v.map(|(value, revision)| Versioned {
                        value: value.into_vec(),
                        revision,
                    })
                })
                .collect()),
            other => Err(unexpected(other)),
        }
    }

    fn scan_from(
        &self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> keyfab_store::Result<Vec<(Vec<u8>, Versioned)>> {
        let call = StoreCall::Scan {
            table: table.byte(),
            prefix: bytes(prefix),
            from: bytes(from),
            limit: u64::try_from(limit).unwrap_or(u64::MAX),
        };
        match self.call(&call)? {
            StoreReply::Entries(entries) => Ok(entries
                .into_iter()
                .map(|(k, value, revision)| {
                    (
                        k.into_vec(),
                        Versioned {
                            value: value.into_vec(),
                            revision,
                        },
                    )
                })
                .collect()),
            other => Err(unexpected(other)),
        }
    }

    fn commit(&self, txn: Txn) -> keyfab_store::Result<Outcome> {
        self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Sent and no answer: the server may have applied it. Only reading tells.
        match self.call(&StoreCall::commit(&txn)) {
            Ok(StoreReply::Committed(Some(r))) => Ok(Outcome::Committed(r)),
            Ok(StoreReply::Committed(None)) => Ok(Outcome::Conflict),
            Ok(other) => Err(unexpected(other)),
            Err(StoreError::Io(why)) => Err(StoreError::Indeterminate(why)),
            Err(e) => Err(e),
        }
    }

    fn revision(&self) -> keyfab_store::Result<u64> {
        match self.call(&StoreCall::Revision)? {
            StoreReply::Revision(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    fn commit_limits(&self) -> CommitLimits {
        SOCKET_COMMIT_LIMITS
    }

    fn commits_sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn concurrent_writers(&self) -> bool {
        true
    }

    fn hold_writers(&self) -> keyfab_store::Result<bool> {
        match self.call(&StoreCall::Hold)? {
            StoreReply::Held(held) => Ok(held),
            other => Err(unexpected(other)),
        }
    }

    fn release_writers(&self) {
        let _ = self.call(&StoreCall::Release);
    }

    fn purge_deleted(&self) -> keyfab_store::Result<Purged> {
        match self.call(&StoreCall::PurgeDeleted)? {
            StoreReply::Purged {
                rewritten: Some(bytes),
                ..
            } => Ok(Purged::Rewritten { bytes }),
            StoreReply::Purged {
                compacted: Some(revision),
                ..
            } => Ok(Purged::Compacted { revision }),
            StoreReply::Purged { .. } => Ok(Purged::NotNeeded),
            other => Err(unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every call survives the wire and does on the far store what it does on a local
    /// one.
    #[test]
    fn calls_round_trip_through_frames() {
        let dir = tempfile::tempdir().unwrap();
        let store = keyfab_store::EmbeddedStore::open(&dir.path().join("s.redb")).unwrap();
        let through = |call: StoreCall| -> StoreReply {
            let wire = frame(&call);
            let back: StoreCall = unframe(&wire[4..]).unwrap();
            let reply = back.run(&store);
            unframe(&frame(&reply)[4..]).unwrap()
        };
        let mut txn = Txn::default();
        txn.require_absent(Table::Meta, b"a")
            .put(Table::Meta, b"a", b"1")
            .put(Table::Pool, b"p/1", b"x")
            .put(Table::Pool, b"p/2", b"y");
        let StoreReply::Committed(Some(rev)) = through(StoreCall::commit(&txn)) else {
            panic!()
        };
        // The same guard fails the second time: nothing written.
        assert!(matches!(
            through(StoreCall::commit(&txn)),
            StoreReply::Committed(None)
        ));
        match through(StoreCall::Get(vec![
            (Table::Meta.byte(), bytes(b"a")),
            (Table::Meta.byte(), bytes(b"b")),
        ])) {
            StoreReply::Values(v) => {
                assert_eq!(
                    v[0].as_ref().map(|(b, r)| (b.to_vec(), *r)),
                    Some((b"1".to_vec(), rev))
                );
                assert!(v[1].is_none());
            }
            other => panic!("{other:?}"),
        }
        let mut del = Txn::default();
        del.require_revision(Table::Meta, b"a", Some(rev))
            .delete_range(Table::Pool, b"p/1", b"p/2");
        assert!(matches!(
            through(StoreCall::commit(&del)),
            StoreReply::Committed(Some(_))
        ));
        match through(StoreCall::Scan {
            table: Table::Pool.byte(),
            prefix: bytes(b"p/"),
            from: bytes(b""),
            limit: 10,
        }) {
            StoreReply::Entries(e) => assert_eq!(e.len(), 1),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            through(StoreCall::Get(vec![(200, bytes(b"a"))])),
            StoreReply::Failed { .. }
        ));
    }

    /// The committed vectors (`tests/vectors/serve-sock/`, FORMATS.md §11) are what this
    /// code writes, byte for byte, and read back to the same messages.
    /// `KEYFAB_BLESS=1` writes them anew.
    #[test]
    fn frames_match_the_committed_vectors() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/vectors/serve-sock");
        let mut txn = Txn::default();
        txn.require_revision(Table::Meta, b"audit_head", Some(41))
            .put(Table::Meta, b"audit_head", b"\x01");
        let vectors: [(&str, Vec<u8>); 6] = [
            ("opening-store.bin", frame(&Opening::<()>::Store)),
            (
                "challenge.bin",
                frame(&Answer::Ok(ByteBuf::from(vec![0xAB; 32]))),
            ),
            (
                "call-get.bin",
                frame(&StoreCall::Get(vec![(Table::Meta.byte(), bytes(b"name"))])),
            ),
            ("call-commit.bin", frame(&StoreCall::commit(&txn))),
            (
                "reply-committed.bin",
                frame(&StoreReply::Committed(Some(42))),
            ),
            (
                "answer-refused.bin",
                frame(&Answer::<()>::Err {
                    code: "locked".into(),
                    message: "state is locked".into(),
                }),
            ),
        ];
        for (name, bytes) in vectors {
            let path = dir.join(name);
            if std::env::var_os("KEYFAB_BLESS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let committed = std::fs::read(&path).unwrap();
            assert_eq!(committed, bytes, "{name}");
            assert_eq!(
                u32::from_be_bytes(committed[..4].try_into().unwrap()) as usize,
                committed.len() - 4
            );
        }
        let call: StoreCall =
            unframe(&std::fs::read(dir.join("call-commit.bin")).unwrap()[4..]).unwrap();
        assert!(
            matches!(call, StoreCall::Commit { ref guards, ref writes, lazy: false } if guards.len() == 1 && writes.len() == 1)
        );
    }

    #[test]
    fn frames_over_the_bound_are_refused() {
        let mut wire = std::io::Cursor::new(frame(&StoreCall::Revision));
        assert!(read_frame(&mut wire, 4096).is_ok());
        let mut big = std::io::Cursor::new((MAX_CLIENT_FRAME + 1).to_be_bytes().to_vec());
        assert!(read_frame(&mut big, MAX_CLIENT_FRAME).is_err());
    }
}
