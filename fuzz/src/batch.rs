//! Batch validation and the store (`afetm-store`). The input is a stream of length-delimited
//! protobuf `Batch` messages from one agent, applied in order as an Ingest stream would.
//!
//! What must hold: the store either applies a batch or refuses it as invalid (a database error
//! on agent input is a poison batch the agent would resend forever); an applied batch moves the
//! agent's stored seq to its seq and applying it again is a duplicate; a refused or duplicate
//! batch leaves the seq alone (never acknowledged-and-dropped); every stored AFCT decodes.

use std::path::Path;

use afetm_proto::v1 as pb;
use afetm_store::{AgentKey, Limits, Store, StoreError, WindowConfig};
use prost::Message as _;

/// The agent every input speaks as.
pub fn hello() -> pb::Hello {
    pb::Hello { agent_id: "fuzz".into(), instance: 1, hostname: "host".into(), target: "target".into() }
}

/// Short windows so that small inputs open and close several.
fn window() -> WindowConfig {
    WindowConfig { len_ns: 1_000_000, grace_ns: 100_000, node_cap: 256 }
}

/// Limits small enough that one input cannot take seconds.
fn limits() -> Limits {
    Limits { max_events_per_batch: 4096, max_symbols_per_batch: 1024, max_logs_per_batch: 256, ..Limits::default() }
}

fn stored_seq(store: &Store) -> u64 {
    let agents = store.list_agents().expect("listing agents");
    agents.iter().find(|a| a.agent_id == "fuzz").map(|a| a.last_seq).expect("the agent said hello")
}

/// One input: see the module doc.
pub fn run(mut data: &[u8]) {
    let mut store = Store::open(Path::new(":memory:"), window(), limits()).expect("in-memory store");
    let (mut last, mut session, _) = store.hello(&hello()).expect("hello");
    let key = AgentKey { agent_id: "fuzz".into(), instance: 1 };
    while !data.is_empty() {
        let Ok(batch) = pb::Batch::decode_length_delimited(&mut data) else { break };
        match store.apply_batch(&key, &mut session, &batch) {
            Ok(a) if !a.duplicate => {
                assert!(batch.seq > last, "applied seq {} at or below {last}", batch.seq);
                last = batch.seq;
                let again = store.apply_batch(&key, &mut session, &batch).expect("re-applying an applied batch");
                assert!(again.duplicate, "seq {} applied twice", batch.seq);
            }
            Ok(_) => assert!(batch.seq <= last, "seq {} above {last} called a duplicate", batch.seq),
            Err(StoreError::Invalid { .. }) => {}
            Err(e) => panic!("agent input made the store fail: {e}"),
        }
        assert_eq!(stored_seq(&store), last, "the stored seq moved without an applied batch");
    }
    store.close_stale(-1).expect("closing every window");
    let windows = store.list_windows(&pb::ListWindowsRequest::default()).expect("listing windows");
    for w in windows {
        for tid in w.tids {
            store.afct(w.id, tid).expect("a stored AFCT decodes");
        }
    }
}
