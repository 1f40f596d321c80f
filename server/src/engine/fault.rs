//! Faults that tests switch on, in debug builds only, to prove that the
//! probes catch a model thread that hangs or dies and a model that loads
//! slowly. `TORCHWIRE_DEBUG_FAULT` holds one of:
//!
//! - `stall-on-prompt:TEXT`: the model thread blocks forever when it starts
//!   a request whose prompt contains TEXT;
//! - `panic-on-prompt:TEXT`: the model thread panics there instead;
//! - `hold-load-until:PATH`: loading waits until the file PATH exists;
//! - `fail-slot-move:TEXT`: moving the KV cache rows of a sequence whose
//!   prompt contains TEXT (when another leaves the batch) fails.
//!
//! Release builds compile none of this and ignore the variable.

use std::path::PathBuf;
use std::time::Duration;

/// The variable that switches a fault on.
pub const VARIABLE: &str = "TORCHWIRE_DEBUG_FAULT";

/// One fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    StallOnPrompt(String),
    PanicOnPrompt(String),
    HoldLoadUntil(PathBuf),
    FailSlotMove(String),
}

impl Fault {
    /// The fault the environment asks for, if any; a value that names no
    /// fault is ignored with a warning.
    pub fn from_env() -> Option<Self> {
        let value = std::env::var(VARIABLE).ok()?;
        // Items without an argument (`fail-generate`) are `crate::fault`'s.
        let fault = value
            .split(',')
            .map(str::trim)
            .filter(|item| item.contains(':'))
            .find_map(Self::parse);
        if fault.is_none() && value.contains(':') {
            tracing::warn!(variable = VARIABLE, %value, "no such debug fault; ignored");
        }
        fault
    }

    fn parse(value: &str) -> Option<Self> {
        let (kind, arg) = value.split_once(':')?;
        if arg.is_empty() {
            return None;
        }
        match kind {
            "stall-on-prompt" => Some(Self::StallOnPrompt(arg.into())),
            "panic-on-prompt" => Some(Self::PanicOnPrompt(arg.into())),
            "hold-load-until" => Some(Self::HoldLoadUntil(arg.into())),
            "fail-slot-move" => Some(Self::FailSlotMove(arg.into())),
            _ => None,
        }
    }

    /// On the model thread, as a request starts: stalls or panics when its
    /// prompt holds the marker.
    pub fn on_prompt(&self, prompt: impl FnOnce() -> String) {
        let marker = match self {
            Self::StallOnPrompt(marker) | Self::PanicOnPrompt(marker) => marker,
            Self::HoldLoadUntil(_) | Self::FailSlotMove(_) => return,
        };
        if !prompt().contains(marker.as_str()) {
            return;
        }
        if let Self::PanicOnPrompt(_) = self {
            panic!("debug fault: the model thread panics");
        }
        tracing::warn!("debug fault: the model thread stalls for good");
        loop {
            std::thread::park();
        }
    }

    /// On the model thread, before a sequence's KV rows move to another
    /// slot: an error when its prompt holds the marker.
    pub fn on_slot_move(&self, prompt: impl FnOnce() -> String) -> Result<(), tch::TchError> {
        match self {
            Self::FailSlotMove(marker) if prompt().contains(marker.as_str()) => Err(
                tch::TchError::Torch("debug fault: moving a KV cache slot fails".into()),
            ),
            _ => Ok(()),
        }
    }

    /// On the model thread, before loading.
    pub fn on_load(&self) {
        if let Self::HoldLoadUntil(path) = self {
            tracing::warn!(path = %path.display(), "debug fault: loading waits for the file");
            while !path.exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_and_unknown_ones_are_none() {
        assert_eq!(
            Fault::parse("stall-on-prompt:STALL ME"),
            Some(Fault::StallOnPrompt("STALL ME".into()))
        );
        assert_eq!(
            Fault::parse("panic-on-prompt:x:y"),
            Some(Fault::PanicOnPrompt("x:y".into()))
        );
        assert_eq!(
            Fault::parse("hold-load-until:/tmp/go"),
            Some(Fault::HoldLoadUntil("/tmp/go".into()))
        );
        assert_eq!(
            Fault::parse("fail-slot-move:MOVE"),
            Some(Fault::FailSlotMove("MOVE".into()))
        );
        assert_eq!(Fault::parse("stall-on-prompt:"), None);
        assert_eq!(Fault::parse("explode:now"), None);
        assert_eq!(Fault::parse("stall-on-prompt"), None);
    }

    #[test]
    fn a_prompt_without_the_marker_passes() {
        Fault::PanicOnPrompt("BOOM".into()).on_prompt(|| "a quiet prompt".into());
        Fault::StallOnPrompt("HANG".into()).on_prompt(|| "a quiet prompt".into());
    }
}
