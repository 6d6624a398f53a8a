//! Drives one switchover to a final phase: load, prepare, observe, step,
//! act, again. Every decision is the machine's (crate::machine); this only
//! moves data between it and the ports (crate::ports).

use std::time::Duration;

use tokio::sync::watch;

use crate::machine::{self, Effect, Loaded, Need, Observation};
use crate::ports::{Clock, Fleet, Leases, Probes, Record, RecordError};

/// How long to wait before reading a switchover again after the store
/// failed to answer.
pub const LOAD_RETRY: Duration = Duration::from_millis(500);
/// How long to wait before a step that failed is tried again.
pub const STEP_RETRY: Duration = Duration::from_millis(200);

/// Runs switchovers over `world` (the store, fleet, probes, leases and
/// clock, in one value or several behind one).
#[derive(Debug)]
pub struct Driver<W> {
    world: W,
}

/// How a run of effects ended.
enum Applied {
    Done,
    /// The store refused the flipped map as invalid.
    InvalidFlip(String),
}

impl<W> Driver<W>
where
    W: Record + Fleet + Probes + Leases + Clock,
{
    /// A driver over `world`.
    pub fn new(world: W) -> Self {
        Self { world }
    }

    /// The world it drives (tests read the fakes back).
    pub fn world(&self) -> &W {
        &self.world
    }

    /// Drives `name` until it is Completed or Aborted, deleted, or
    /// `shutdown` turns true (the term ended: the next leader resumes it
    /// from its stored phase).
    pub async fn drive(&self, name: &str, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let loaded = match self.world.load(name).await {
                Ok(loaded) => loaded,
                Err(RecordError::Gone(text)) => {
                    tracing::warn!(switchover = name, "stopping: {text}");
                    return;
                }
                Err(error) => {
                    tracing::warn!(switchover = name, %error, "cannot read the switchover; retrying");
                    tokio::select! {
                        () = self.world.sleep(LOAD_RETRY) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            if loaded.spec.phase.is_final() {
                return;
            }
            let phase = loaded.spec.phase;
            let step = tokio::select! {
                step = self.step(&loaded) => step,
                _ = shutdown.changed() => return,
            };
            if let Err(error) = step {
                tracing::warn!(switchover = name, %phase, %error, "switchover step failed; retrying");
                tokio::select! {
                    () = self.world.sleep(STEP_RETRY) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    /// One step of `loaded`: revoke what the phase revokes, observe what it
    /// needs, and carry out what the machine decides.
    pub async fn step(&self, loaded: &Loaded) -> Result<(), RecordError> {
        let prepare = machine::prepare(loaded);
        for cell in &prepare.revoke {
            self.world.revoke(cell);
        }
        let observation = self.observe(loaded, prepare.need).await;
        let effects = machine::step(loaded, observation, self.world.now());
        match self.apply(loaded, effects).await? {
            Applied::Done => Ok(()),
            Applied::InvalidFlip(text) => {
                // Nothing was written: end it before the flip.
                let message = format!("the flipped shard map is invalid ({text})");
                let effects = machine::abort(loaded, message, self.world.now());
                match self.apply(loaded, effects).await? {
                    Applied::Done | Applied::InvalidFlip(_) => Ok(()),
                }
            }
        }
    }

    async fn observe(&self, loaded: &Loaded, need: Need) -> Observation {
        match need {
            Need::Nothing => Observation::Nothing,
            Need::Barrier { version } => Observation::Barrier(
                self.world
                    .barrier(&loaded.spec, &loaded.sources(), version)
                    .await,
            ),
            Need::Positions => Observation::Positions(
                self.world
                    .positions(
                        &loaded.map_spec,
                        &loaded.spec.moves,
                        loaded.record_version(),
                    )
                    .await,
            ),
            Need::LeaseExpiry => Observation::LeaseExpiry(self.world.expires_in(&loaded.sources())),
            Need::Standbys { owners } => {
                Observation::Standbys(self.world.standbys(&owners, &loaded.sources()))
            }
        }
    }

    async fn apply(&self, loaded: &Loaded, effects: Vec<Effect>) -> Result<Applied, RecordError> {
        for effect in effects {
            match effect {
                Effect::Restore(cells) => cells.iter().for_each(|c| self.world.restore(c)),
                Effect::Wait(duration) => self.world.sleep(duration).await,
                Effect::Save(save) => {
                    if save.spec.phase == atoll_model::SwitchoverPhase::Aborted {
                        tracing::warn!(
                            switchover = loaded.name(),
                            message = save.spec.message.as_deref().unwrap_or_default(),
                            "switchover aborted"
                        );
                    }
                    match self.world.save(loaded, &save).await {
                        Ok(()) => {}
                        Err(RecordError::Invalid(text)) if save.flip => {
                            return Ok(Applied::InvalidFlip(text));
                        }
                        Err(error) => return Err(error),
                    }
                }
            }
        }
        Ok(Applied::Done)
    }
}
