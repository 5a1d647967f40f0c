//! The methods of the evaluation (sec. IV.B's "comparison targets" and AFETM itself), each a
//! [`crate::method::Method`]:
//! - [`afetm`]: AFETM's GCN (AFCT_GCN) on each window's AFCT, and the daemon's stored verdicts;
//! - [`edc`]: FCT_EDC (Wang et al., the paper's [16]) on full FCTs;
//! - [`gdc`]: AFCT_GDC (Pham et al. [2], eq. 14, on AFCTs);
//! - [`logs`]: the idealized log-based method;
//! - [`bag`]: a topology-free control (softmax regression on the bag of an AFCT's functions);
//! - [`chimera`]: Chimera on each run's logs (detection, root-cause lines);
//! - [`logsage`]: LogSage without an LLM (FILE, then GARCA over the training runs);
//! - [`fusion`]: the GCN, Chimera and LogSage combined into one verdict.

pub mod afetm;
pub mod bag;
pub mod chimera;
pub mod edc;
pub mod fusion;
pub mod gdc;
pub mod logs;
pub mod logsage;

use afetm_proto as pb;

/// A tree's functions in preorder (the wire order), names only.
pub fn preorder(tree: &pb::Tree) -> Vec<&str> {
    tree.nodes.iter().map(|n| n.function.as_str()).collect()
}
