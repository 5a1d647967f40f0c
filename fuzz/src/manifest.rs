//! A model directory (`afetm-analyzer serve --model DIR`): `Model::from_parts` on any
//! `manifest.json` text and safetensors bytes. The input is a little-endian `u32` length, that
//! many bytes of manifest, and the weights after them.
//!
//! What must hold: a bad manifest or weights file is refused with an error (no panic, no
//! allocation the files do not back), and a model that loads diagnoses a tree.

use std::path::Path;

use afetm_diagnosis::model::Model;
use afetm_proto::v1 as pb;

/// Splits an input into manifest text and weights bytes.
pub fn split(data: &[u8]) -> Option<(&str, &[u8])> {
    let (len, rest) = data.split_first_chunk::<4>()?;
    let (manifest, weights) = rest.split_at((u32::from_le_bytes(*len) as usize).min(rest.len()));
    Some((std::str::from_utf8(manifest).ok()?, weights))
}

/// Joins manifest text and weights into one input (for the seeds).
pub fn join(manifest: &str, weights: &[u8]) -> Vec<u8> {
    let mut out = (manifest.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(manifest.as_bytes());
    out.extend_from_slice(weights);
    out
}

/// A two-node tree over the first vocabulary entry and an unknown function.
fn tree(model: &Model) -> pb::Tree {
    let (module, name) = model.manifest.vocab.functions().first().cloned().unwrap_or_default();
    let node = |function: String, parent: i32, children: Vec<u32>| pb::TreeNode {
        module: module.clone(),
        function,
        parent,
        children,
        calls: 1,
        color: pb::Color::White as i32,
        ..Default::default()
    };
    pb::Tree { nodes: vec![node(name, -1, vec![1]), node("fuzz_unknown".into(), 0, vec![])], ..Default::default() }
}

/// One input: see the module doc.
pub fn run(data: &[u8]) {
    let Some((manifest, weights)) = split(data) else { return };
    if let Ok(model) = Model::from_parts(manifest, weights, Path::new("fuzz-model")) {
        let d = model.diagnose(&tree(&model), 3).expect("a loaded model diagnoses a tree");
        assert!(d.top.len() <= 3, "more suspects than asked for");
    }
}
