//! A TCP proxy between the gateway and a dependency, to cut the network
//! without stopping the shared server (the ChaosProxy pattern of the Rust
//! registry's own test suite).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct ChaosProxy {
    pub addr: SocketAddr,
    broken: watch::Sender<bool>,
}

impl ChaosProxy {
    pub async fn start(target: SocketAddr) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (broken, _) = watch::channel(false);
        let proxy = Arc::new(Self { addr, broken });
        let state = proxy.broken.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if *state.borrow() {
                    drop(client); // refused while broken
                    continue;
                }
                let mut rx = state.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut server) => {}
                        _ = rx.wait_for(|b| *b) => {} // cut live connections too
                    }
                });
            }
        });
        proxy
    }

    pub fn break_networking(&self) {
        self.broken.send_replace(true);
    }

    pub fn restore_networking(&self) {
        self.broken.send_replace(false);
    }
}
