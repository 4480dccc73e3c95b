//! Stopping a run cleanly. SIGINT (Ctrl-C) or SIGTERM to `tandem run` is counted by
//! [`Stop`]; the supervisor then asks the trainer and the generators to stop (SIGTERM:
//! the trainer finishes the step it is training, writes its checkpoint unless the
//! newest already is of that step, and leaves; each generator leaves, which gives its
//! open leases back), waits for them, and stops the coordinator last (its state is
//! saved with every change). A second signal kills every process at once: what the
//! trainer did since its newest checkpoint is then done again on `--resume`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::supervisor::{Ending, Event, Supervisor};
use crate::{Error, Result};

/// How long the trainer and the generators have to stop (the trainer finishes the
/// step it is in and writes a checkpoint) before they are killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the coordinator has to stop.
const COORDINATOR_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The stop requests `tandem run` received: how many SIGINT / SIGTERM so far.
#[derive(Clone, Debug, Default)]
pub struct Stop(Arc<AtomicU32>);

impl Stop {
    /// Counts the SIGINT and SIGTERM this process receives from now on (on a thread of
    /// its own); from now on they no longer end the process.
    pub fn on_signals() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let stop = Stop::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the signal thread", e))?;
        let (mut int, mut term) = {
            let _in_rt = rt.enter();
            let int = signal(SignalKind::interrupt());
            let term = signal(SignalKind::terminate());
            (
                int.map_err(|e| Error::io("handling SIGINT", e))?,
                term.map_err(|e| Error::io("handling SIGTERM", e))?,
            )
        };
        let count = stop.0.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                rt.block_on(async move {
                    loop {
                        tokio::select! {
                            _ = int.recv() => {}
                            _ = term.recv() => {}
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .map_err(|e| Error::io("starting the signal thread", e))?;
        Ok(stop)
    }

    /// Asks for a stop, as a signal does.
    pub fn request(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// Stop requests so far: 1 stops the run cleanly, 2 kills its processes.
    pub fn requests(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}

impl Supervisor {
    /// Stops the run: the trainer and the generators first (SIGTERM), then the
    /// coordinator; each is killed after its timeout, and all at once on a second
    /// stop request ([`Ending::Killed`]).
    pub(crate) fn stop_all(
        &mut self,
        stop: &Stop,
        on: &mut dyn FnMut(Event<'_>),
    ) -> Result<Ending> {
        on(Event::Stopping);
        let (coordinator, workers) = self.procs.split_at_mut(1);
        for p in workers.iter_mut() {
            p.terminate();
        }
        if !wait_or_kill(workers, stop, STOP_TIMEOUT)? {
            self.kill_all(on);
            return Ok(Ending::Killed);
        }
        coordinator[0].terminate();
        if !wait_or_kill(coordinator, stop, COORDINATOR_STOP_TIMEOUT)? {
            self.kill_all(on);
            return Ok(Ending::Killed);
        }
        Ok(Ending::Stopped)
    }

    fn kill_all(&mut self, on: &mut dyn FnMut(Event<'_>)) {
        on(Event::Killing);
        for p in self.procs.iter_mut() {
            p.kill();
        }
    }
}

/// Waits for `procs` to exit; kills those still running after `timeout`. False when a
/// second stop request came first.
fn wait_or_kill(
    procs: &mut [crate::process::Proc],
    stop: &Stop,
    timeout: Duration,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut running = 0;
        for p in procs.iter_mut() {
            if p.exited()?.is_none() {
                running += 1;
            }
        }
        if running == 0 {
            return Ok(true);
        }
        if stop.requests() > 1 {
            return Ok(false);
        }
        if Instant::now() > deadline {
            for p in procs.iter_mut() {
                if let Ok(None) = p.exited() {
                    tracing::warn!(process = %p.name, "did not stop within {} s: killed", timeout.as_secs());
                    p.kill();
                }
            }
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
