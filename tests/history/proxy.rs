//! A TCP proxy that faults can be injected into: it forwards bytes both ways, and can add
//! latency, reset every open connection, or black-hole traffic for a while (connections are
//! accepted, but nothing is forwarded until it heals; held bytes are delivered then, as TCP
//! would after a partition).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

struct State {
    target: String,
    latency_ms: AtomicU64,
    black_hole_until: Mutex<Option<Instant>>,
    resets: watch::Sender<u64>,
}

impl State {
    /// Waits while the proxy is black-holed, then for the current latency.
    async fn gate(&self) {
        loop {
            let until = *self.black_hole_until.lock().unwrap();
            match until {
                Some(until) if Instant::now() < until => {
                    sleep((until - Instant::now()).min(Duration::from_millis(20))).await;
                }
                _ => break,
            }
        }
        let latency = self.latency_ms.load(Ordering::Relaxed);
        if latency > 0 {
            sleep(Duration::from_millis(latency)).await;
        }
    }
}

/// A running proxy on `127.0.0.1:port`, stopped when dropped.
pub struct Proxy {
    pub port: u16,
    pub name: String,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free port and forwards each connection to `target` (`host:port`).
    pub async fn start(name: &str, target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            target,
            latency_ms: AtomicU64::new(0),
            black_hole_until: Mutex::new(None),
            resets: watch::Sender::new(0),
        });
        let s = state.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(forward(inbound, s.clone()));
            }
        });
        Self {
            port,
            name: name.to_owned(),
            state,
            accept,
        }
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Delays every chunk of bytes, each way, by `latency` (zero: none).
    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::Relaxed);
    }

    /// Stops forwarding (and connecting) for `period`.
    pub fn black_hole(&self, period: Duration) {
        *self.state.black_hole_until.lock().unwrap() = Some(Instant::now() + period);
    }

    /// Resets (RST) every connection open now.
    pub fn reset_all(&self) {
        self.state.resets.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.reset_all();
    }
}

async fn forward(mut inbound: TcpStream, state: Arc<State>) {
    let mut resets = state.resets.subscribe();
    resets.borrow_and_update();
    state.gate().await;
    let Ok(mut outbound) = TcpStream::connect(&state.target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let reset = {
        let (mut ri, mut wi) = inbound.split();
        let (mut ro, mut wo) = outbound.split();
        tokio::select! {
            _ = pump(&mut ri, &mut wo, &state) => false,
            _ = pump(&mut ro, &mut wi, &state) => false,
            _ = resets.changed() => true,
        }
    };
    if reset {
        let _ = inbound.set_zero_linger();
        let _ = outbound.set_zero_linger();
    }
    // Dropping both sockets closes the connection both ways (with RST after a reset).
}

async fn pump(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    state: &State,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        state.gate().await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
