//! `HOME/serve.sock`, mode 0600: how the site's own commands reach a serving site.
//!
//! Two kinds of connection ([`keyfab_node::socket_store`] has the framing):
//! - a **store session**: any `keyfab site …` command, run while `site serve` holds the
//!   embedded store, opens the home as usual (it unlocks the keystore itself) and uses
//!   the server's store through the socket, after proving it holds the site's cluster
//!   key. Its commits land between the server's, each guarded on what it read; after
//!   each, connections re-check their station and entitlement contexts whose batch CA
//!   key is gone are forgotten, so a revocation bites from its commit on.
//! - one **administrative request** of the server's own, answered once:
//!   `status` (`keyfab site status`, with what only the running server knows), and,
//!   while a node sealed by shares waits for them ([`wait_for_shares`]), `unseal` and
//!   `unseal.status`.
//!
//! Whoever may open the socket may already read the home; a store session also needs
//! the keystore's passphrase (or shares), as the command would with the site stopped.

use super::api::AppState;
use keyfab_crypto::secret::SecretBytes;
use keyfab_custody::unseal::{UnsealProgress, Unsealer};
use keyfab_node::socket_store::{
    self, frame, proof_message, unframe, Answer, Opening, StoreCall, StoreReply, MAX_CLIENT_FRAME,
    SOCKET,
};
use keyfab_node::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Largest administrative request accepted on the socket.
const MAX_REQUEST: u32 = 4096;

/// What a command asks a running `site serve` itself over its socket.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", deny_unknown_fields)]
pub enum AdminRequest {
    /// The site's status (`keyfab site status`).
    #[serde(rename = "status")]
    Status,
    /// Submit one unseal share.
    #[serde(rename = "unseal")]
    Unseal {
        /// The share, as its holder typed it.
        share: ShareText,
    },
    /// How many shares are in.
    #[serde(rename = "unseal.status")]
    UnsealStatus,
}

/// An unseal share on its way through the socket: wiped when dropped, never printed.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShareText(pub String);

impl std::fmt::Debug for ShareText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShareText(..)")
    }
}

impl Drop for ShareText {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// What the running `site serve` answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminAnswer {
    /// How far unsealing is.
    Unseal(UnsealProgress),
    /// Where the site stands.
    Status(Box<crate::status::SiteStatus>),
}

fn handle(state: &AppState, req: AdminRequest) -> Result<AdminAnswer> {
    Ok(match req {
        AdminRequest::Status => {
            let mut status = crate::status::site_status(&state.node)?;
            status.serving = Some(state.metrics.activity(&state.limits));
            AdminAnswer::Status(Box::new(status))
        }
        AdminRequest::Unseal { .. } | AdminRequest::UnsealStatus => {
            return Err(Error::Precondition("this node is unsealed already".into()))
        }
    })
}

/// Binds the socket (replacing a stale one) with mode 0600.
pub(super) fn bind(home: &Path) -> Result<(tokio::net::UnixListener, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let path = home.join(SOCKET);
    if path.exists() {
        std::fs::remove_file(&path)?;
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, path))
}

/// Answers connections on `listener` until the task is dropped.
pub(super) async fn serve(listener: tokio::net::UnixListener, state: AppState) {
    let state = Arc::new(state);
    while let Ok((stream, _)) = listener.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            let opening = read_frame(&mut stream, MAX_REQUEST)
                .await
                .map(|body| unframe::<Opening<AdminRequest>>(&body));
            match opening {
                Ok(Ok(Opening::Store)) => store_session(stream, state).await,
                Ok(Ok(Opening::Admin(req))) => {
                    let answer = {
                        let state = state.clone();
                        tokio::task::spawn_blocking(move || handle(&state, req))
                            .await
                            .unwrap_or_else(|_| Err(Error::Bug("admin request".into())))
                    };
                    write_answer(&mut stream, answer).await;
                }
                Ok(Err(e)) => {
                    write_answer::<()>(&mut stream, Err(Error::InvalidInput(e.to_string()))).await
                }
                Err(_) => {}
            }
        });
    }
}

/// A store session: the challenge, the proof, then store calls until the client closes.
async fn store_session(mut stream: UnixStream, state: Arc<AppState>) {
    let mut challenge = [0u8; 32];
    state.node.rng.fill(&mut challenge);
    write_answer(&mut stream, Ok(ByteBuf::from(challenge.to_vec()))).await;
    let Ok(body) = read_frame(&mut stream, MAX_REQUEST).await else {
        return;
    };
    let proven = unframe::<ByteBuf>(&body)
        .map_err(|e| Error::InvalidInput(e.to_string()))
        .and_then(|signature| {
            let key = state.node.cluster_signer()?.verifying_key();
            key.verify(&proof_message(&challenge), &signature)
                .map_err(|_| Error::Locked)
        });
    let refused = proven.is_err();
    if refused {
        tracing::warn!(target: "keyfab::admin", "store session refused: no proof of the site's cluster key");
    }
    write_answer(&mut stream, proven).await;
    if refused {
        return;
    }
    tracing::debug!(target: "keyfab::admin", "store session opened");
    // While the session holds the committer back: until when, at the latest.
    let mut holding: Option<tokio::time::Instant> = None;
    loop {
        let next = match holding {
            Some(until) => {
                match tokio::time::timeout_at(until, read_frame(&mut stream, MAX_CLIENT_FRAME))
                    .await
                {
                    Ok(next) => next,
                    Err(_) => {
                        tracing::warn!(target: "keyfab::admin", "a command held the line past its bound; the line goes on");
                        release(&state, &mut holding);
                        continue;
                    }
                }
            }
            None => read_frame(&mut stream, MAX_CLIENT_FRAME).await,
        };
        let Ok(body) = next else { break };
        let reply = match unframe::<StoreCall>(&body) {
            Ok(call) => {
                let state = state.clone();
                let release_first = matches!(call, StoreCall::Release | StoreCall::Hold);
                if release_first {
                    release(&state, &mut holding);
                }
                let reply = tokio::task::spawn_blocking(move || {
                    let reply = call.run(state.node.store.as_ref());
                    if matches!(reply, StoreReply::Committed(Some(_))) {
                        after_lent_commit(&state);
                    }
                    reply
                })
                .await
                .unwrap_or_else(|_| StoreReply::Failed {
                    kind: "io".into(),
                    message: "the server failed this call".into(),
                });
                if matches!(reply, StoreReply::Held(true)) {
                    holding = Some(tokio::time::Instant::now() + socket_store::HOLD_MAX);
                }
                reply
            }
            Err(e) => StoreReply::Failed {
                kind: "io".into(),
                message: e.to_string(),
            },
        };
        if stream.write_all(&frame(&reply)).await.is_err() {
            break;
        }
    }
    release(&state, &mut holding);
    tracing::debug!(target: "keyfab::admin", "store session closed");
}

/// Lets the committer go on, if this session held it back.
fn release(state: &AppState, holding: &mut Option<tokio::time::Instant>) {
    if holding.take().is_some() {
        if let Some(gate) = state.node.store.writers_gate() {
            gate.release();
        }
    }
}

/// What a command's commit may have changed that this process holds in memory: a
/// station revoked (connections re-check theirs on their next request), a batch CA key
/// destroyed by a revocation (its unsealed copy is dropped).
fn after_lent_commit(state: &AppState) {
    state
        .revocations
        .fetch_add(1, std::sync::atomic::Ordering::Release);
    if let Err(e) = state.provisioner.forget_destroyed_batch_keys() {
        tracing::warn!(target: "keyfab::admin", error = %e, "destroyed batch CA keys not yet forgotten");
    }
}

async fn read_frame(
    stream: &mut UnixStream,
    max: u32,
) -> std::io::Result<zeroize::Zeroizing<Vec<u8>>> {
    let len = stream.read_u32().await?;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {len} bytes (at most {max})"),
        ));
    }
    let mut body = zeroize::Zeroizing::new(vec![0u8; len as usize]);
    stream.read_exact(&mut body).await?;
    Ok(body)
}

async fn write_answer<T: Serialize>(stream: &mut UnixStream, answer: Result<T>) {
    let answer = match answer {
        Ok(v) => Answer::Ok(v),
        Err(e) => Answer::Err {
            code: e.code().as_str().to_owned(),
            message: e.to_string(),
        },
    };
    let _ = stream.write_all(&frame(&answer)).await;
}

/// A node sealed by shares, before it serves: takes shares one by one on
/// `HOME/serve.sock` (`keyfab site unseal`) until the threshold is met, then returns the
/// keystore's secret. Every other request is refused with `locked`. Returns `locked` if
/// the process is told to stop first.
pub fn wait_for_shares(
    home: &Path,
    mut unsealer: Unsealer,
    locked_on: Option<(std::net::SocketAddr, crate::stations::ServerIdentity)>,
    waiting: impl FnOnce(UnsealProgress, Option<std::net::SocketAddr>),
) -> Result<(SecretBytes, Option<std::net::SocketAddr>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Bug(format!("runtime: {e}")))?;
    runtime.block_on(async {
        let (listener, path) = bind(home)?;
        let why = |p: UnsealProgress| {
            format!(
                "the site is sealed: {} of {} unseal shares given",
                p.accepted, p.threshold
            )
        };
        let reason = Arc::new(std::sync::Mutex::new(why(unsealer.progress())));
        // With a serving identity kept from an unsealed run, stations get `locked`.
        let (station_task, station_addr) = match locked_on {
            Some((addr, identity)) => {
                let tls = Arc::new(super::tls_config(&identity)?);
                let tcp = tokio::net::TcpListener::bind(addr).await?;
                let bound = tcp.local_addr()?;
                let task = tokio::spawn(super::sealed::answer_refusing(tcp, tls, "locked", reason.clone()));
                (Some(task), Some(bound))
            }
            None => (None, None),
        };
        waiting(unsealer.progress(), station_addr);
        let stop = super::shutdown_signal();
        tokio::pin!(stop);
        while !unsealer.progress().unsealed {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                _ = &mut stop => break,
            };
            let mut stream = stream;
            let Ok(body) = read_frame(&mut stream, MAX_REQUEST).await else {
                continue;
            };
            let answer = match unframe::<Opening<AdminRequest>>(&body) {
                Ok(Opening::Admin(AdminRequest::Unseal { share })) => unsealer
                    .submit(&share.0)
                    .map(AdminAnswer::Unseal)
                    .map_err(Error::from),
                Ok(Opening::Admin(AdminRequest::UnsealStatus)) => {
                    Ok(AdminAnswer::Unseal(unsealer.progress()))
                }
                Ok(_) => {
                    let p = unsealer.progress();
                    Err(Error::Sealed(format!(
                        "{} of {} unseal shares given",
                        p.accepted, p.threshold
                    )))
                }
                Err(e) => Err(Error::InvalidInput(e.to_string())),
            };
            if let Err(e) = &answer {
                tracing::warn!(target: "keyfab::unseal", error = %e, "admin request refused while sealed");
            } else {
                let p = unsealer.progress();
                tracing::info!(target: "keyfab::unseal", accepted = p.accepted, threshold = p.threshold, "unseal share accepted");
                if let Ok(mut r) = reason.lock() {
                    *r = why(p);
                }
            }
            write_answer(&mut stream, answer).await;
        }
        if let Some(task) = station_task {
            task.abort();
            let _ = task.await;
        }
        drop(listener);
        let _ = std::fs::remove_file(&path);
        Ok((unsealer.passphrase()?, station_addr))
    })
}

/// Sends `req` to the `site serve` running in `home`; `None` if none is.
pub fn request(home: &Path, req: AdminRequest) -> Option<Result<AdminAnswer>> {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(home.join(SOCKET)).ok()?;
    let run = || -> Result<AdminAnswer> {
        stream.write_all(&zeroize::Zeroizing::new(frame(&Opening::Admin(req))))?;
        socket_store::answer_of(&mut stream)
    };
    Some(run())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_share() {
        let share = AdminRequest::Unseal {
            share: ShareText("kfs1-0123abcd".into()),
        };
        assert!(!format!("{share:?}").contains("0123abcd"));
    }
}
