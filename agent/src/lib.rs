//! The afetm agent: attaches one eBPF uprobe program to the functions of a plan, reads its ring
//! buffer, turns return addresses and stack copies into (function, caller, callstack) events
//! (AFETM sec. III.B) and streams them to the analyzer.

pub mod calibrate;
pub mod governor;
pub mod inject;
pub mod lastcalls;
pub mod logtail;
pub mod metrics;
pub mod procmaps;
pub mod reader;
pub use afetm_elf::{probe_site, symbols};
pub mod tracer;
pub mod transport;
pub mod unwind;
