//! A TCP proxy between the gateway and a dependency, to cut the network
//! without stopping the shared server (the ChaosProxy pattern of the Rust
//! registry's own test suite), or to make the dependency hang: connections
//! accepted, bytes read, nothing ever answered.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, copy_bidirectional};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Pass,
    /// Connections refused, live ones cut.
    Broken,
    /// Connections accepted and read, never answered (a hung server).
    Stalled,
    /// Requests reach the server, its answers are dropped: the commands
    /// run, and their callers never hear of it.
    Mute,
}

pub struct ChaosProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
}

/// Forwards `client`'s bytes to `server` and drops the server's answers,
/// until either side leaves or the mode changes (then both are closed).
async fn mute(mut client: TcpStream, mut server: TcpStream, mut mode: watch::Receiver<Mode>) {
    let (mut from_client, _) = client.split();
    let (mut from_server, mut to_server) = server.split();
    let mut sink = [0u8; 4096];
    tokio::select! {
        // The mode first, as in the passing state.
        biased;
        _ = mode.wait_for(|m| *m != Mode::Mute) => {}
        _ = tokio::io::copy(&mut from_client, &mut to_server) => {}
        _ = async {
            while let Ok(n) = from_server.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        } => {}
    }
}

/// Reads and discards until the peer leaves or the mode changes.
async fn swallow(mut client: TcpStream, mut mode: watch::Receiver<Mode>) {
    let mut sink = [0u8; 4096];
    loop {
        tokio::select! {
            read = client.read(&mut sink) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = mode.wait_for(|m| *m != Mode::Stalled) => return,
        }
    }
}

impl ChaosProxy {
    pub async fn start(target: SocketAddr) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (mode, _) = watch::channel(Mode::Pass);
        let proxy = Arc::new(Self { addr, mode });
        let state = proxy.mode.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let current = *state.borrow();
                match current {
                    Mode::Broken => {
                        drop(client); // refused while broken
                        continue;
                    }
                    Mode::Stalled => {
                        tokio::spawn(swallow(client, state.subscribe()));
                        continue;
                    }
                    Mode::Mute => {
                        let rx = state.subscribe();
                        tokio::spawn(async move {
                            if let Ok(server) = TcpStream::connect(target).await {
                                mute(client, server, rx).await;
                            }
                        });
                        continue;
                    }
                    Mode::Pass => {}
                }
                let mut rx = state.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    // The mode first: `select!` otherwise picks a branch at
                    // random, and a poll that came after `stall()` could
                    // still copy the next command through to the server
                    // (seen under the full suite's load: a call answered
                    // 200 through a "stalled" Redis).
                    let changed = tokio::select! {
                        biased;
                        m = rx.wait_for(|m| *m != Mode::Pass) => m.ok().map(|m| *m),
                        _ = copy_bidirectional(&mut client, &mut server) => None,
                    };
                    // A live connection goes silent too when stalled, and
                    // loses its answers when muted.
                    match changed {
                        Some(Mode::Stalled) => {
                            drop(server);
                            swallow(client, rx).await;
                        }
                        Some(Mode::Mute) => mute(client, server, rx).await,
                        _ => {}
                    }
                });
            }
        });
        proxy
    }

    pub fn break_networking(&self) {
        self.mode.send_replace(Mode::Broken);
    }

    /// The dependency hangs: it accepts connections and reads requests but
    /// never answers, like a server stuck in a long command or swapping.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stalled);
    }

    /// Redis runs what it is sent, and its answers are lost on the way.
    pub fn mute(&self) {
        self.mode.send_replace(Mode::Mute);
    }

    /// Back to normal; connections held while stalled or muted are closed.
    pub fn restore_networking(&self) {
        self.mode.send_replace(Mode::Pass);
    }
}
