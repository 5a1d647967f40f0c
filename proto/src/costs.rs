//! What a probe costs on this host: the file `afetm-agent --calibrate` writes and
//! `afetm-analyzer select --costs` reads, so the selection's budget bounds real overhead
//! instead of a call count (AFETM's eqs 3-4 weigh calls; a call-stack event costs more than a
//! plain one, a single-stepped probe site ~15x an emulated one).
//!
//! ```json
//! { "host": "vm1", "kernel": "6.18.0", "calls": 200000,
//!   "emulated": { "count_ns": 660, "event_ns": 790, "callstack_ns": 1100 },
//!   "single_stepped": { "count_ns": 10500, "event_ns": 10700, "callstack_ns": 11000 },
//!   "callstack_frames": 12, "per_frame_ns": 25 }
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::plan::Mode;

/// Nanoseconds one call of a probed function gains, per probe mode, at one kind of site.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModeCosts {
    pub count_ns: f64,
    pub event_ns: f64,
    /// A call-stack event unwound in the kernel, `callstack_frames` deep.
    pub callstack_ns: f64,
}

/// Measured probe costs of one host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeCosts {
    pub host: String,
    pub kernel: String,
    /// Calls per measurement (the median of several is kept).
    pub calls: u64,
    /// Probe on an instruction the kernel emulates (push, nop, jumps).
    pub emulated: ModeCosts,
    /// Probe on an instruction the kernel single-steps.
    pub single_stepped: ModeCosts,
    /// Depth of the chain behind `callstack_ns`.
    pub callstack_frames: u32,
    /// Extra ns per frame of a deeper chain.
    pub per_frame_ns: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CostsError {
    #[error("reading probe costs {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("probe costs {path}: {error}")]
    Parse { path: String, error: serde_json::Error },
    #[error("probe costs {path}: {field} is {value}; costs must be finite and >= 0")]
    Bad { path: String, field: &'static str, value: f64 },
}

impl ProbeCosts {
    pub fn load(path: &Path) -> Result<ProbeCosts, CostsError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| CostsError::Io { path: p.clone(), error })?;
        let c: ProbeCosts =
            serde_json::from_str(&text).map_err(|error| CostsError::Parse { path: p.clone(), error })?;
        for (field, value) in [
            ("emulated.count_ns", c.emulated.count_ns),
            ("emulated.event_ns", c.emulated.event_ns),
            ("emulated.callstack_ns", c.emulated.callstack_ns),
            ("single_stepped.count_ns", c.single_stepped.count_ns),
            ("single_stepped.event_ns", c.single_stepped.event_ns),
            ("single_stepped.callstack_ns", c.single_stepped.callstack_ns),
            ("per_frame_ns", c.per_frame_ns),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(CostsError::Bad { path: p, field, value });
            }
        }
        Ok(c)
    }

    /// ns per call of a function probed in `mode` at a site of that kind; a call-stack event
    /// `frames` deep (frames beyond the calibrated depth cost `per_frame_ns` each).
    pub fn per_call_ns(&self, mode: Mode, emulated: bool, frames: u32) -> f64 {
        let m = if emulated { &self.emulated } else { &self.single_stepped };
        match mode {
            Mode::Count => m.count_ns,
            Mode::Event => m.event_ns,
            Mode::Callstack => m.callstack_ns + self.per_frame_ns * frames.saturating_sub(self.callstack_frames) as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs() -> ProbeCosts {
        ProbeCosts {
            host: "h".into(),
            kernel: "k".into(),
            calls: 1,
            emulated: ModeCosts { count_ns: 600.0, event_ns: 800.0, callstack_ns: 1000.0 },
            single_stepped: ModeCosts { count_ns: 10_000.0, event_ns: 10_200.0, callstack_ns: 10_400.0 },
            callstack_frames: 10,
            per_frame_ns: 20.0,
        }
    }

    #[test]
    fn per_call_cost_by_mode_site_and_depth() {
        let c = costs();
        assert_eq!(c.per_call_ns(Mode::Event, true, 0), 800.0);
        assert_eq!(c.per_call_ns(Mode::Event, false, 0), 10_200.0);
        assert_eq!(c.per_call_ns(Mode::Callstack, true, 4), 1000.0);
        assert_eq!(c.per_call_ns(Mode::Callstack, true, 30), 1400.0);
    }

    #[test]
    fn file_round_trip_and_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        std::fs::write(&p, serde_json::to_string(&costs()).unwrap()).unwrap();
        assert_eq!(ProbeCosts::load(&p).unwrap(), costs());
        let mut bad = costs();
        bad.per_frame_ns = -1.0;
        std::fs::write(&p, serde_json::to_string(&bad).unwrap()).unwrap();
        assert!(ProbeCosts::load(&p).unwrap_err().to_string().contains("per_frame_ns is -1"));
        std::fs::write(&p, "{}").unwrap();
        assert!(matches!(ProbeCosts::load(&p), Err(CostsError::Parse { .. })));
    }
}
