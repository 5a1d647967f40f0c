//! A run or a window as a GARCA case (the evaluation's runs and the daemon's windows alike):
//! FILE's region of its logs as the mean embedding of the region's templates, and its call
//! trees as the share of their nodes per function, hashed into [`TREE_DIM`] buckets. Both
//! halves are centred on the graph's mean, so that what every case shares (the access log's
//! ordinary lines, the functions every request calls) does not make every pair similar.

use afetm_logs::{Embedder, Templates, line::lines_of};
use afetm_proto as pb;

use super::{
    file::{self, extract},
    garca,
};

/// Width of a case's tree vector.
pub const TREE_DIM: usize = 64;

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The share of the trees' nodes per function, hashed.
pub fn tree_vector<'a>(trees: impl IntoIterator<Item = &'a pb::Tree>) -> Vec<f32> {
    let mut v = vec![0f32; TREE_DIM];
    let mut n = 0f32;
    for t in trees {
        for node in &t.nodes {
            v[(fnv(&node.function) % TREE_DIM as u64) as usize] += 1.0;
            n += 1.0;
        }
    }
    v.iter_mut().for_each(|x| *x /= n.max(1.0));
    v
}

/// Turns logs and trees into cases, with the templates and embedder of the graph's logs.
pub struct CaseBuilder {
    templates: Templates,
    embedder: Embedder,
    mean: Option<garca::Case>,
}

impl CaseBuilder {
    /// Mines templates and fits the embedder on the graph's logs (one window each).
    pub fn fit<'a>(logs: impl IntoIterator<Item = &'a [(String, String)]>) -> CaseBuilder {
        let (templates, embedder, _) = crate::model::view(logs);
        CaseBuilder { templates, embedder, mean: None }
    }

    /// A case, not yet centred, and the first `show` lines of its FILE region.
    pub fn raw<'a>(
        &self,
        logs: &[(String, String)],
        trees: impl IntoIterator<Item = &'a pb::Tree>,
        show: usize,
    ) -> (garca::Case, Vec<String>) {
        let lines = lines_of(logs);
        let region = extract(&lines, &self.templates, &self.embedder, file::Config::default());
        let mut v = vec![0f32; self.embedder.dim];
        for &i in &region {
            let id = self.templates.learn(&lines[i].message);
            let e = self.embedder.embed(&self.templates.text(id).unwrap_or_default());
            v.iter_mut().zip(e).for_each(|(a, b)| *a += b / region.len() as f32);
        }
        let shown = region.iter().take(show).map(|&i| lines[i].raw.clone()).collect();
        (garca::Case { logs: v, trees: tree_vector(trees), label: None }, shown)
    }

    /// Takes the mean of `cases` as the centre from now on.
    pub fn centre_on(&mut self, cases: &[garca::Case]) {
        let n = cases.len().max(1) as f32;
        let avg = |f: &dyn Fn(&garca::Case) -> &Vec<f32>| -> Vec<f32> {
            let w = cases.first().map(|c| f(c).len()).unwrap_or(0);
            (0..w).map(|i| cases.iter().map(|c| f(c)[i]).sum::<f32>() / n).collect()
        };
        self.mean = Some(garca::Case { logs: avg(&|c| &c.logs), trees: avg(&|c| &c.trees), label: None });
    }

    /// `c` minus the centre (unchanged before [`CaseBuilder::centre_on`]).
    pub fn centred(&self, mut c: garca::Case) -> garca::Case {
        if let Some(m) = &self.mean {
            c.logs.iter_mut().zip(&m.logs).for_each(|(a, b)| *a -= b);
            c.trees.iter_mut().zip(&m.trees).for_each(|(a, b)| *a -= b);
        }
        c
    }
}
