//! A UDP relay that holds every datagram for a fixed time in each
//! direction: a link with a round trip, for benchmarks of QUIC transfers
//! (this machine's kernel has no netem).
//!
//!   outpost-udpdelay LISTEN TARGET ONE_WAY_MS
//!
//! Each client address gets its own socket towards TARGET; datagrams keep
//! their order (the delay is the same for all). Prints the bound address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

type Delayed = mpsc::UnboundedSender<(Instant, Vec<u8>)>;

/// Sends what `queue` holds through `socket` (to `to`, or its connected
/// peer), each datagram at its time.
fn sender(socket: Arc<UdpSocket>, to: Option<SocketAddr>) -> Delayed {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((at, datagram)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            let sent = match to {
                Some(to) => socket.send_to(&datagram, to).await,
                None => socket.send(&datagram).await,
            };
            if let Err(e) = sent {
                eprintln!("outpost-udpdelay: send: {e}");
            }
        }
    });
    tx
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, target, delay_ms] = args.as_slice() else {
        eprintln!("usage: outpost-udpdelay LISTEN TARGET ONE_WAY_MS");
        std::process::exit(64);
    };
    let (Ok(target), Ok(delay_ms)) = (target.parse::<SocketAddr>(), delay_ms.parse::<u64>()) else {
        eprintln!("outpost-udpdelay: TARGET must be host:port and ONE_WAY_MS a number");
        std::process::exit(64);
    };
    let delay = Duration::from_millis(delay_ms);
    let front = Arc::new(UdpSocket::bind(listen).await?);
    println!("{}", front.local_addr()?);
    let mut clients: HashMap<SocketAddr, Delayed> = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = front.recv_from(&mut buf).await?;
        let upstream = match clients.get(&from) {
            Some(up) => up.clone(),
            None => {
                let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
                back.connect(target).await?;
                // Answers go back to this client, delayed as well.
                let to_client = sender(front.clone(), Some(from));
                let reader = back.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok(n) = reader.recv(&mut buf).await {
                        if to_client.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                });
                let up = sender(back, None);
                clients.insert(from, up.clone());
                up
            }
        };
        let _ = upstream.send((Instant::now() + delay, buf[..n].to_vec()));
    }
}
