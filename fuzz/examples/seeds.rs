//! Writes the seed corpus of the fuzz targets into `fuzz/corpus/<target>/`: small valid inputs
//! that reach deep into each reader, which libFuzzer then mutates. Run from `fuzz/`:
//! `cargo run --example seeds` (needs `gcc` for the ELF seeds). The FDDB seeds are cut from a
//! real campaign export and one plan from a real `select --algorithm infogain` run (see
//! `corpus/README.md`); this leaves them alone.

use std::{fs, path::Path, process::Command};

use afetm_diagnosis::{
    Class, Manifest, Model, PlanKey,
    gcn::{Dims, Gcn},
    graph::Vocab,
    model::{FORMAT, TrainingSummary},
};
use afetm_fault::FaultKind;
use afetm_proto::{plan::PlanFile, v1 as pb};
use prost::Message as _;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus dir");
    fs::write(dir.join(name), bytes).expect("writing a seed");
}

fn sym(id: u32, name: &str) -> pb::Symbol {
    pb::Symbol { id, module: "server".into(), name: name.into() }
}

fn call(tid: u32, ts_ns: u64, function: u32, caller: u32) -> pb::CallEvent {
    pb::CallEvent { pid: 100, tid, ts_ns, function, caller, callstack: if caller == 0 { vec![] } else { vec![caller] } }
}

fn stream(batches: &[pb::Batch]) -> Vec<u8> {
    batches.iter().flat_map(|b| b.encode_length_delimited_to_vec()).collect()
}

/// Three batches over two windows of 1 ms (the target's window): symbols, calls on two
/// threads, counts, a log line, a thread's fate, a process exit and the final batch.
fn batches() {
    let first = pb::Batch {
        seq: 1,
        agent_clock_ns: 900_000,
        symbols: vec![sym(1, "main"), sym(2, "handle"), sym(3, "parse"), sym(4, "reply")],
        events: vec![call(100, 10, 2, 1), call(100, 20, 3, 2), call(100, 30, 4, 2), call(101, 40, 2, 1)],
        counts: vec![pb::CallCount { function: 3, calls: 7, interval_ns: 1_000 }],
        logs: vec![pb::LogRecord { file: "server.log".into(), ts_ns: 50, unix_ms: 1, text: "started".into() }],
        ..Default::default()
    };
    let second = pb::Batch {
        seq: 2,
        agent_clock_ns: 2_500_000,
        events: vec![call(100, 1_200_000, 3, 2), call(101, 1_300_000, 4, 3)],
        kernel_drops: 1,
        ..Default::default()
    };
    let last = pb::Batch {
        seq: 3,
        agent_clock_ns: 3_000_000,
        exits: vec![pb::ProcessExit { pid: 100, ts_ns: 2_900_000 }],
        fates: vec![pb::ThreadFate {
            pid: 100,
            tid: 101,
            ts_ns: 2_800_000,
            kind: pb::FateKind::Killed as i32,
            code: 11,
            last_calls: vec![],
            took_signal: true,
            fault_calls: vec![2, 3],
            stack_ids: vec![3, 2],
            stack: vec![],
        }],
        final_batch: true,
        ..Default::default()
    };
    write("batch", "three-batches", &stream(&[first.clone(), second.clone(), last]));
    write("batch", "resent", &stream(&[first.clone(), first.clone(), second.clone()]));
    let mut unknown = second.clone();
    unknown.events.push(call(100, 1_400_000, 9, 2));
    write("batch", "unknown-symbol", &stream(&[first.clone(), unknown]));
    let mut jump = second;
    jump.seq = u64::MAX;
    write("batch", "seq-jump", &stream(&[first, jump]));
}

fn plans() {
    let text = r#"{"target":{"path":"/usr/bin/redis-server"},"version":3,
        "points":[{"function":"processCommand","mode":"event"},{"function":"zmalloc","mode":"callstack"},
        {"function":"*","mode":"count"}]}"#;
    PlanFile::parse(text).expect("the seed plan parses");
    write("plan", "redis", text.as_bytes());
    write("plan", "pid", br#"{"target":{"pid":42},"points":[{"function":"main","mode":"event"}]}"#);
}

fn elves() {
    let src = std::env::temp_dir().join("afetm-fuzz-seed.c");
    fs::write(
        &src,
        "#include <stdio.h>\nstatic int add(int a, int b) { return a + b; }\n\
        int twice(int x) { return add(x, x); }\nint main(int c, char **v) { printf(\"%d\\n\", twice(c)); return 0; }\n",
    )
    .expect("writing the C seed");
    for (name, flags) in [("c-debug", &["-g", "-O1"][..]), ("c-stripped", &["-O2", "-s"][..])] {
        let out = std::env::temp_dir().join(name);
        let ok = Command::new("gcc").args(flags).arg("-o").arg(&out).arg(&src).status().expect("running gcc");
        assert!(ok.success(), "gcc failed");
        write("elf", name, &fs::read(&out).expect("reading the binary"));
    }
}

fn manifests() {
    let functions = vec![("server".to_string(), "handle".to_string()), ("server".into(), "parse".into())];
    let classes = vec![Class::Normal, Class::Fault { function: "parse".into(), kind: FaultKind::Crash }];
    let dims = Dims { vocab: functions.len() + 1, embed: 4, hidden: 4, classes: classes.len() };
    let manifest = Manifest {
        format: FORMAT,
        target: "server".into(),
        module: "server".into(),
        classes,
        vocab: Vocab::new(functions),
        plan: PlanKey { traced: vec!["handle".into(), "parse".into()], callstack: vec![] },
        dims,
        window_ms: 1000,
        threshold: 0.5,
        data_hash: "seed".into(),
        training: TrainingSummary::default(),
        profile: Default::default(),
    };
    let net = Gcn::new(dims, 7, &candle_core::Device::Cpu).expect("a small network");
    let dir = std::env::temp_dir().join("afetm-fuzz-model");
    Model::new(manifest, net).save(&dir).expect("saving the seed model");
    let text = fs::read_to_string(dir.join("manifest.json")).expect("manifest");
    let weights = fs::read(dir.join("model.safetensors")).expect("weights");
    Model::from_parts(&text, &weights, &dir).expect("the seed model loads");
    write("manifest", "small-model", &afetm_fuzz::manifest::join(&text, &weights));
}

fn main() {
    batches();
    plans();
    elves();
    manifests();
    println!("seeds written under corpus/");
}
