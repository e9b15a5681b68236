//! The floor under creditgate's HTTP path: the least reverse proxy hyper 1
//! can be, on the same runtime layout as the gateway (one current-thread
//! runtime per core, `SO_REUSEPORT` listeners). It forwards every request
//! as it came and streams the answer back: no auth, no metering, no header
//! rules, no metrics, no logs, and not even a pool: each client connection
//! keeps one upstream connection of its own. Never shipped; measured by
//! `bench/hyper_floor.sh` beside nginx and the gateway to learn how much
//! of the gateway's CPU per request is hyper and tokio themselves.
//!
//!   LISTEN=127.0.0.1:18209 UPSTREAM=127.0.0.1:18080 \
//!     cargo run --release --example hyper_floor

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

// The gateway's allocator, so the floor differs from it only in what it does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Upstream = Arc<Mutex<Option<SendRequest<Incoming>>>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen: SocketAddr = std::env::var("LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:18209".into())
        .parse()?;
    let upstream: SocketAddr = std::env::var("UPSTREAM")
        .unwrap_or_else(|_| "127.0.0.1:18080".into())
        .parse()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..cores)
        .map(|_| std::thread::spawn(move || serve(listen, upstream)))
        .collect();
    for thread in threads {
        thread.join().map_err(|_| "a runtime thread panicked")??;
    }
    Ok(())
}

fn serve(listen: SocketAddr, upstream: SocketAddr) -> Result<(), std::io::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(listen)?;
        let listener = socket.listen(1024)?;
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::spawn(async move {
                let held: Upstream = Arc::new(Mutex::new(None));
                let service =
                    hyper::service::service_fn(move |req| forward(req, held.clone(), upstream));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn forward(
    req: Request<Incoming>,
    held: Upstream,
    upstream: SocketAddr,
) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    let taken = held.lock().map_err(|_| "poisoned")?.take();
    let mut sender = match taken {
        Some(sender) if !sender.is_closed() => sender,
        _ => {
            let stream = TcpStream::connect(upstream).await?;
            stream.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            sender
        }
    };
    // HTTP/1 answers one request at a time: the previous answer's body has
    // been streamed to the client before its next request arrives.
    sender.ready().await?;
    let response = sender.send_request(req).await?;
    *held.lock().map_err(|_| "poisoned")? = Some(sender);
    Ok(response)
}
