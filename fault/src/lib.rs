//! AFETM's fault model (004_eb31801e7dc37aff.txt, sec. III.C.1) as one typed value.
//!
//! A [`Fault`] is what `afetm-inject --fault` takes, what the campaign plans and what the FDDB
//! stores; all three read and write it through [`Fault`]'s `FromStr`/`Display`, so the text
//! form (`crash`, `deadlock`, `ip+N`, `input:ARG:BIT`, `output:BIT`) has exactly one parser.
//! [`FaultKind`] is the type alone, for counting and for the diagnosis classes.
#![deny(missing_docs)]

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A fault spec that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad fault {0:?}: expected crash, deadlock, ip+N, input:ARG:BIT or output:BIT")]
pub struct BadFault(pub String);

/// The five fault types of AFETM's fault model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FaultKind {
    /// The instruction pointer moved forward at the function's entry.
    #[serde(rename = "ip+n")]
    IpPlusN,
    /// The process is killed at the function's entry.
    #[serde(rename = "crash")]
    Crash,
    /// The process stops at the function's entry.
    #[serde(rename = "deadlock")]
    Deadlock,
    /// One bit of one parameter flipped at entry.
    #[serde(rename = "input")]
    Input,
    /// One bit of the return value flipped at return.
    #[serde(rename = "output")]
    Output,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 5] =
        [FaultKind::IpPlusN, FaultKind::Crash, FaultKind::Deadlock, FaultKind::Input, FaultKind::Output];

    /// The kind's name as stored in the FDDB and printed in reports.
    pub fn as_str(&self) -> &'static str {
        match self {
            FaultKind::IpPlusN => "ip+n",
            FaultKind::Crash => "crash",
            FaultKind::Deadlock => "deadlock",
            FaultKind::Input => "input",
            FaultKind::Output => "output",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FaultKind {
    type Err = BadFault;

    fn from_str(s: &str) -> Result<FaultKind, BadFault> {
        FaultKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| BadFault(s.to_string()))
    }
}

/// One fault: its type and parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// Process crash (SIGKILL once the function is entered).
    Crash,
    /// Deadlock: the process stops (SIGSTOP once the function is entered).
    Deadlock,
    /// IP+N at entry; `None` = the injector's default (skip one instruction).
    IpPlus(Option<u32>),
    /// One bit of parameter `arg` flipped at entry. `arg` counts integer/pointer parameters in
    /// ABI order: 0-5 are rdi..r9, 6 and up the stack slots above the return address.
    Input {
        /// Parameter index (see above), below 32.
        arg: u32,
        /// Bit to flip, below 64.
        bit: u32,
    },
    /// One bit of the return value (rax) flipped at return.
    Output {
        /// Bit to flip, below 64.
        bit: u32,
    },
}

impl Fault {
    /// The fault's type.
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::Crash => FaultKind::Crash,
            Fault::Deadlock => FaultKind::Deadlock,
            Fault::IpPlus(_) => FaultKind::IpPlusN,
            Fault::Input { .. } => FaultKind::Input,
            Fault::Output { .. } => FaultKind::Output,
        }
    }

    /// Whether the fault ends the whole process at its first application (crash, deadlock):
    /// then every thread of the process is affected, not only the one that called.
    pub fn ends_process(&self) -> bool {
        matches!(self, Fault::Crash | Fault::Deadlock)
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Crash => write!(f, "crash"),
            Fault::Deadlock => write!(f, "deadlock"),
            Fault::IpPlus(None) => write!(f, "ip+"),
            Fault::IpPlus(Some(n)) => write!(f, "ip+{n}"),
            Fault::Input { arg, bit } => write!(f, "input:{arg}:{bit}"),
            Fault::Output { bit } => write!(f, "output:{bit}"),
        }
    }
}

impl FromStr for Fault {
    type Err = BadFault;

    fn from_str(s: &str) -> Result<Fault, BadFault> {
        let bad = || BadFault(s.to_string());
        let num = |v: &str, max: u32| {
            // Digits only: u32's parser would also take "+3".
            v.bytes()
                .all(|b| b.is_ascii_digit())
                .then_some(())
                .and_then(|_| v.parse::<u32>().ok())
                .filter(|n| *n < max)
                .ok_or_else(bad)
        };
        Ok(match s {
            "crash" => Fault::Crash,
            "deadlock" => Fault::Deadlock,
            "ip+" => Fault::IpPlus(None),
            _ if s.starts_with("ip+") => match num(&s[3..], 4096)? {
                0 => return Err(bad()),
                n => Fault::IpPlus(Some(n)),
            },
            _ => match s.split(':').collect::<Vec<_>>().as_slice() {
                ["input", arg, bit] => Fault::Input { arg: num(arg, 32)?, bit: num(bit, 64)? },
                ["output", bit] => Fault::Output { bit: num(bit, 64)? },
                _ => return Err(bad()),
            },
        })
    }
}

/// Where and when a fault was applied: one thread of the victim, the first and last
/// application (`CLOCK_MONOTONIC` ns, the clock of the agent's events and windows) and how many
/// calls it was applied to. `afetm-inject` prints one per thread; the campaign labels a call
/// tree with the fault only if its thread and window saw an application.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The victim's process id.
    pub pid: u32,
    /// The thread the fault was applied in.
    pub tid: u32,
    /// First application.
    pub first_ns: u64,
    /// Last application (equal to `first_ns` after one).
    pub last_ns: u64,
    /// Applications in this thread.
    pub count: u64,
}

impl Applied {
    /// Whether an application in this thread may have fallen in `[start_ns, end_ns]`. Only the
    /// first and last are known, so a thread applied to before and after a window counts as
    /// applied in it too (a permanent fault is applied at every call of the function).
    pub fn overlaps(&self, start_ns: u64, end_ns: u64) -> bool {
        self.first_ns <= end_ns && self.last_ns >= start_ns
    }
}

impl Serialize for Fault {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fault {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Fault, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn syntax() {
        assert_eq!("crash".parse::<Fault>().unwrap(), Fault::Crash);
        assert_eq!("deadlock".parse::<Fault>().unwrap(), Fault::Deadlock);
        assert_eq!("ip+".parse::<Fault>().unwrap(), Fault::IpPlus(None));
        assert_eq!("ip+3".parse::<Fault>().unwrap(), Fault::IpPlus(Some(3)));
        assert_eq!("input:1:0".parse::<Fault>().unwrap(), Fault::Input { arg: 1, bit: 0 });
        assert_eq!("output:63".parse::<Fault>().unwrap(), Fault::Output { bit: 63 });
        for bad in ["", "crash!", "output:64", "input:1", "input:x:1", "ip+x", "ip+0", "ip++3", "kill", "input:+1:2"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
        assert_eq!(Fault::Input { arg: 2, bit: 5 }.to_string(), "input:2:5");
        assert_eq!(Fault::IpPlus(None).kind(), FaultKind::IpPlusN);
        assert_eq!("ip+n".parse::<FaultKind>().unwrap(), FaultKind::IpPlusN);
        assert_eq!(serde_json::to_string(&Fault::Output { bit: 7 }).unwrap(), "\"output:7\"");
        assert!(serde_json::from_str::<Fault>("\"output:99\"").is_err());
    }

    fn any_fault() -> impl Strategy<Value = Fault> {
        prop_oneof![
            Just(Fault::Crash),
            Just(Fault::Deadlock),
            proptest::option::of(1u32..4096).prop_map(Fault::IpPlus),
            (0u32..32, 0u32..64).prop_map(|(arg, bit)| Fault::Input { arg, bit }),
            (0u32..64).prop_map(|bit| Fault::Output { bit }),
        ]
    }

    proptest! {
        /// Text and JSON forms read back to the same value, and the kind survives.
        #[test]
        fn round_trip(f in any_fault()) {
            let text = f.to_string();
            prop_assert_eq!(text.parse::<Fault>().unwrap(), f);
            let json = serde_json::to_string(&f).unwrap();
            prop_assert_eq!(serde_json::from_str::<Fault>(&json).unwrap(), f);
            prop_assert_eq!(f.kind().as_str().parse::<FaultKind>().unwrap(), f.kind());
        }
    }
}
