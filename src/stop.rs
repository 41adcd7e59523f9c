//! A command's stop signal (a future: SIGTERM, a test's channel) as a
//! [`CancellationToken`] its tasks can share.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A token cancelled when `stop` resolves, and the task that watches it
/// (it ends when the token is cancelled either way).
pub fn token(
    stop: impl Future<Output = ()> + Send + 'static,
) -> (CancellationToken, JoinHandle<()>) {
    let token = CancellationToken::new();
    let watcher = {
        let token = token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop => token.cancel(),
                _ = token.cancelled() => {}
            }
        })
    };
    (token, watcher)
}
