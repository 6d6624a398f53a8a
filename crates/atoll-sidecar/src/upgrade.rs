//! Hot upgrade: a new sidecar binary takes the listening sockets of the
//! running one over a Unix socket (`SCM_RIGHTS`), and the old one drains.
//!
//! 1. The new sidecar (`--take-over`) connects to the old one's upgrade
//!    socket and asks. It gets the listening sockets (inbound, outbound,
//!    outbound Bolt) as file descriptors: the same sockets, so nothing is
//!    refused while both run and the registered address never changes.
//! 2. Once it has its configuration and serves, it says `ready`.
//! 3. The old one stops accepting. HTTP/1.1 connections finish the request
//!    in flight and close (a keep-alive client reconnects to the same
//!    socket, now served by the new process); HTTP/2 and gRPC get GOAWAY.
//!    Bolt has no GOAWAY, so each Bolt connection is handed over alive:
//!    the old sidecar stops reading it, lets the calls in flight on it
//!    finish and their answers go out, then sends the socket and the bytes
//!    it read but did not decode to the new sidecar, which goes on reading
//!    where it stopped. No Bolt call sees the change.
//! 4. The old one says `done` and exits without ending its registry
//!    session (the new sidecar registered the same instance; the old
//!    session runs out by itself).
//!
//! Messages are length-prefixed JSON (`u32` big-endian), with descriptors
//! attached to the first byte of the message that carries them and raw
//! bytes after a `buffered` message.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde_json::{Value, json};

use crate::bolt::Handed;

/// The most bytes of one message (JSON, or buffered Bolt bytes).
const MAX_MESSAGE: usize = 32 * 1024 * 1024;

fn send(stream: &UnixStream, message: &Value, fds: &[OwnedFd]) -> std::io::Result<()> {
    let body = message.to_string().into_bytes();
    let length = u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes();
    let borrowed: Vec<_> = fds.iter().map(AsFd::as_fd).collect();
    let mut space =
        vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(borrowed.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(std::io::Error::other(
            "too many descriptors for one message",
        ));
    }
    // The descriptors ride on the length; the JSON follows.
    let sent = rustix::net::sendmsg(
        stream,
        &[IoSlice::new(&length)],
        &mut control,
        SendFlags::empty(),
    )?;
    if sent != length.len() {
        (&*stream).write_all(&length[sent..])?;
    }
    (&*stream).write_all(&body)
}

fn receive(stream: &UnixStream) -> std::io::Result<(Value, Vec<OwnedFd>)> {
    let mut length = [0u8; 4];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        stream,
        &mut [IoSliceMut::new(&mut length)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?
    .bytes;
    if got == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the other sidecar hung up",
        ));
    }
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got < length.len() {
        (&*stream).read_exact(&mut length[got..])?;
    }
    let length = u32::from_be_bytes(length) as usize;
    if length > MAX_MESSAGE {
        return Err(std::io::Error::other(format!(
            "a message of {length} bytes"
        )));
    }
    let mut body = vec![0u8; length];
    (&*stream).read_exact(&mut body)?;
    let message = serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::other(format!("not a message: {e}")))?;
    Ok((message, fds))
}

fn read_bytes(stream: &UnixStream, length: usize) -> std::io::Result<Vec<u8>> {
    if length > MAX_MESSAGE {
        return Err(std::io::Error::other(format!("{length} buffered bytes")));
    }
    let mut bytes = vec![0u8; length];
    (&*stream).read_exact(&mut bytes)?;
    Ok(bytes)
}

/// The listening sockets a sidecar serves, as descriptors to pass on.
#[derive(Debug)]
pub(crate) struct Sockets {
    pub(crate) inbound: OwnedFd,
    pub(crate) outbound: OwnedFd,
    pub(crate) outbound_bolt: Option<OwnedFd>,
    pub(crate) admin: Option<OwnedFd>,
}

impl Sockets {
    fn try_clone(&self) -> std::io::Result<Vec<OwnedFd>> {
        let mut fds = vec![self.inbound.try_clone()?, self.outbound.try_clone()?];
        for fd in [&self.outbound_bolt, &self.admin].into_iter().flatten() {
            fds.push(fd.try_clone()?);
        }
        Ok(fds)
    }
}

/// The new side: what it took over, and the connection to the old one.
#[derive(Debug)]
pub(crate) struct TakenOver {
    pub(crate) sockets: Sockets,
    stream: UnixStream,
}

/// Takes the sockets of the sidecar serving `path` (blocking).
pub(crate) fn take_over(path: &Path) -> Result<TakenOver, String> {
    let at = |e: std::io::Error| format!("taking over from the sidecar at {}: {e}", path.display());
    let stream = UnixStream::connect(path).map_err(at)?;
    send(&stream, &json!({"take": true}), &[]).map_err(at)?;
    let (answer, fds) = receive(&stream).map_err(at)?;
    let mut fds = fds.into_iter();
    let (Some(inbound), Some(outbound)) = (fds.next(), fds.next()) else {
        return Err(format!(
            "the sidecar at {} sent {answer} without its listening sockets",
            path.display()
        ));
    };
    let outbound_bolt = if answer["outboundBolt"] == true {
        fds.next()
    } else {
        None
    };
    let admin = if answer["admin"] == true {
        fds.next()
    } else {
        None
    };
    Ok(TakenOver {
        sockets: Sockets {
            inbound,
            outbound,
            outbound_bolt,
            admin,
        },
        stream,
    })
}

/// The connection to the old sidecar, once its sockets are taken.
#[derive(Debug)]
pub(crate) struct Handover {
    stream: UnixStream,
}

impl TakenOver {
    /// The sockets, and what remains of the handover.
    pub(crate) fn split(self) -> (Sockets, Handover) {
        (
            self.sockets,
            Handover {
                stream: self.stream,
            },
        )
    }
}

impl Handover {
    /// Says `ready` and receives the Bolt connections the old sidecar
    /// hands over, until it says `done` (blocking; run it on a blocking
    /// thread). Each goes to `adopt`.
    pub(crate) fn ready(self, mut adopt: impl FnMut(Handed)) -> Result<usize, String> {
        let at = |e: std::io::Error| format!("receiving from the old sidecar: {e}");
        send(&self.stream, &json!({"ready": true}), &[]).map_err(at)?;
        let mut adopted = 0;
        loop {
            let (message, mut fds) = receive(&self.stream).map_err(at)?;
            if message["done"] == true {
                return Ok(adopted);
            }
            let Some(socket) = fds.pop() else {
                return Err(format!("a handed connection without its socket: {message}"));
            };
            let length = message["buffered"].as_u64().unwrap_or(0) as usize;
            let buffered = read_bytes(&self.stream, length).map_err(at)?;
            adopt(Handed {
                socket,
                buffered: buffered.into(),
                inbound: message["inbound"] == true,
            });
            adopted += 1;
        }
    }
}

/// The old side: serves the upgrade socket at `path` until a new sidecar
/// is ready; then `on_ready` is told (the caller stops accepting and starts
/// handing Bolt connections to `handed`), and the handed connections are
/// passed on until `handed` closes.
pub(crate) async fn offer(
    path: PathBuf,
    sockets: Sockets,
    on_ready: tokio::sync::oneshot::Sender<()>,
    mut handed: tokio::sync::mpsc::UnboundedReceiver<Handed>,
) {
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "no upgrade socket: this sidecar cannot be upgraded in place");
            return;
        }
    };
    let stream = loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let _ = stream.set_nonblocking(false);
        let fds = match sockets.try_clone() {
            Ok(fds) => fds,
            Err(error) => {
                tracing::warn!(%error, "cannot pass the listening sockets on");
                continue;
            }
        };
        let outbound_bolt = sockets.outbound_bolt.is_some();
        let admin = sockets.admin.is_some();
        let handshake = tokio::task::spawn_blocking(move || -> std::io::Result<UnixStream> {
            let (asked, _) = receive(&stream)?;
            if asked["take"] != true {
                return Err(std::io::Error::other(format!("asked {asked}")));
            }
            send(
                &stream,
                &json!({"listeners": true, "outboundBolt": outbound_bolt, "admin": admin}),
                &fds,
            )?;
            let (ready, _) = receive(&stream)?;
            if ready["ready"] != true {
                return Err(std::io::Error::other(format!("said {ready}")));
            }
            Ok(stream)
        })
        .await;
        match handshake {
            Ok(Ok(stream)) => break stream,
            Ok(Err(error)) => tracing::warn!(%error, "an upgrade did not complete; still serving"),
            Err(error) => tracing::warn!(%error, "an upgrade did not complete; still serving"),
        }
    };
    tracing::info!("a new sidecar took over the listening sockets; draining");
    drop(listener);
    let _ = std::fs::remove_file(&path);
    let _ = on_ready.send(());
    let mut passed = 0usize;
    while let Some(connection) = handed.recv().await {
        let stream_ref = stream.try_clone();
        let sent = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let stream = stream_ref?;
            send(
                &stream,
                &json!({"inbound": connection.inbound, "buffered": connection.buffered.len()}),
                &[connection.socket],
            )?;
            (&stream).write_all(&connection.buffered)
        })
        .await;
        match sent {
            Ok(Ok(())) => passed += 1,
            Ok(Err(error)) => tracing::warn!(%error, "a Bolt connection could not be handed over"),
            Err(error) => tracing::warn!(%error, "a Bolt connection could not be handed over"),
        }
    }
    let _ = tokio::task::spawn_blocking(move || send(&stream, &json!({"done": true}), &[])).await;
    tracing::info!(
        connections = passed,
        "Bolt connections handed to the new sidecar"
    );
}
