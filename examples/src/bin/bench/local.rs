//! Warm local grain calls, one silo, vs a tokio mpsc + oneshot request/reply loop (the floor any in-process
//! actor call stands on).

use std::time::Duration;

use grains_silo::{Silo, SiloConfig};
use tokio::sync::{mpsc, oneshot};

use crate::harness::{header, measure, row};

pub(crate) use self::echo::{Echo, EchoRef};

mod echo {
    use grains::prelude::*;

    /// A grain that does almost nothing, to measure the call path itself.
    #[grain]
    pub(crate) struct Echo;

    #[grain]
    impl Echo {
        /// Returns its argument plus one.
        pub(crate) async fn bump(&self, n: u64) -> u64 {
            n + 1
        }
    }
}

/// Measures local calls at 1 and 64 callers (each caller its own grain, each baseline caller its own actor).
pub(crate) async fn run(window: Duration) -> anyhow::Result<()> {
    let silo = Silo::builder().config(SiloConfig { gateway: false, ..SiloConfig::default() }).start().await?;
    header("Local call, warm activation, same silo", "mpsc+oneshot");
    for callers in [1usize, 64] {
        // Each caller uses its own reference, as a caller holding one would: no clone per call (a reference's
        // clone counts a reference to the silo, one counter every core would write). Leaked: a bench's lifetime.
        let refs: &'static [EchoRef] = (0..callers).map(|i| silo.grain::<Echo>(i as i64)).collect::<Vec<_>>().leak();
        for r in refs {
            r.bump(0).await?; // warm: activate before measuring
        }
        let ours = measure(callers, window, move |w| async move {
            refs[w].bump(1).await?;
            Ok(())
        })
        .await?;

        let actors: &'static [mpsc::UnboundedSender<(u64, oneshot::Sender<u64>)>] = (0..callers)
            .map(|_| {
                let (tx, mut rx) = mpsc::unbounded_channel::<(u64, oneshot::Sender<u64>)>();
                tokio::spawn(async move {
                    while let Some((n, reply)) = rx.recv().await {
                        let _ = reply.send(n + 1);
                    }
                });
                tx
            })
            .collect::<Vec<_>>()
            .leak();
        let baseline = measure(callers, window, move |w| async move {
            let (tx, rx) = oneshot::channel();
            actors[w].send((1, tx)).map_err(|_| anyhow::anyhow!("actor gone"))?;
            rx.await?;
            Ok(())
        })
        .await?;
        row("local call", callers, ours, baseline);
    }
    silo.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
