//! A TCP relay that can cut a node off from a server (network partitions).

use super::*;

/// A TCP relay on a free loopback port to `target` whose link can be cut
/// like a network partition: while cut, nothing crosses in either
/// direction and new connections hang unanswered (dropped, not refused,
/// so only timeouts notice). Healing resumes every held connection.
/// Its tasks end with the test's runtime.
pub struct Partition {
    pub addr: SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Partition {
    pub async fn start(target: SocketAddr) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let (cut, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    let _ = rx.clone().wait_for(|cut| !*cut).await;
                    let Ok(up) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::join!(relay(dr, uw, rx.clone()), relay(ur, dw, rx));
                });
            }
        });
        Partition { addr, cut }
    }

    /// Cut (true) or heal (false) the link.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// Copy `r` to `w`, holding each chunk while the link is cut.
async fn relay(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut cut: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if cut.wait_for(|c| !*c).await.is_err() {
            return;
        }
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.wait_for(|c| !*c).await.is_err() || w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}
