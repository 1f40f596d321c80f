//! `BackgroundGrpc`: a gRPC service of the test's own (an OTLP collector) on
//! 127.0.0.1:0, on its own thread and runtime so that it keeps answering
//! while a test blocks (e.g. waiting for a process to exit).

use std::net::SocketAddr;

use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;

/// The running service; it stops on drop.
pub struct BackgroundGrpc {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl BackgroundGrpc {
    /// Serves `routes` (e.g. `Routes::new(SomeServiceServer::new(..))`).
    pub fn start(routes: Routes) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tonic::transport::Server::builder()
                    .add_routes(routes)
                    .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        Self {
            addr,
            stop: Some(stop),
        }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for BackgroundGrpc {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
