//! An event's embedding from its template's tokens: hashed unigrams and bigrams, TF-IDF
//! weighted, L2-normalized (the "hashing trick"). It stands in for the pretrained semantic
//! embeddings the papers use (Chimera's event embeddings, LogSage's BigLog): those need
//! weights from the network, and this needs nothing. Events whose templates share words land
//! near each other; the models learn the rest.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// The default embedding width.
pub const DIM: usize = 64;

/// Hashes tokens into a fixed-width vector, weighting each by its inverse document frequency
/// over the templates it was fitted on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Embedder {
    /// Width of an embedding.
    pub dim: usize,
    /// IDF per token hash; a token never seen at fit time weighs `unseen`.
    idf: HashMap<u64, f32>,
    unseen: f32,
}

impl Default for Embedder {
    fn default() -> Self {
        Embedder { dim: DIM, idf: HashMap::new(), unseen: 1.0 }
    }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The unigram and bigram hashes of a template's words (lower case; Drain's `<*>` dropped).
pub fn grams(text: &str) -> Vec<u64> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric() && c != '<' && c != '>')
        .filter(|w| !w.is_empty() && *w != "<" && *w != ">" && *w != "<>")
        .map(|w| w.to_lowercase())
        .collect();
    let mut out: Vec<u64> = words.iter().map(|w| fnv(w)).collect();
    out.extend(words.windows(2).map(|p| fnv(&format!("{} {}", p[0], p[1]))));
    out
}

impl Embedder {
    /// IDF over `documents` (template texts): `ln((1 + N) / (1 + df)) + 1`.
    pub fn fit<'a>(dim: usize, documents: impl IntoIterator<Item = &'a str>) -> Embedder {
        let mut df: HashMap<u64, u32> = HashMap::new();
        let mut n = 0u32;
        for d in documents {
            n += 1;
            let mut g = grams(d);
            g.sort_unstable();
            g.dedup();
            for h in g {
                *df.entry(h).or_default() += 1;
            }
        }
        let idf_of = |df: u32| ((1.0 + n as f32) / (1.0 + df as f32)).ln() + 1.0;
        let idf = df.into_iter().map(|(h, d)| (h, idf_of(d))).collect();
        Embedder { dim: dim.max(1), idf, unseen: idf_of(0) }
    }

    /// The embedding of a template's text (all zeros for a text without words).
    pub fn embed(&self, text: &str) -> Vec<f32> {
        // Ordered: floating-point sums must not depend on a hash map's per-process order.
        let mut tf: std::collections::BTreeMap<u64, u32> = std::collections::BTreeMap::new();
        for h in grams(text) {
            *tf.entry(h).or_default() += 1;
        }
        let mut v = vec![0f32; self.dim];
        for (h, n) in tf {
            let w = (1.0 + (n as f32).ln()) * self.idf.get(&h).copied().unwrap_or(self.unseen);
            let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
            v[(h % self.dim as u64) as usize] += sign * w;
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }
}

/// Cosine similarity of two vectors of the same width (0 when either is all zeros).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 { 0.0 } else { dot / (na * nb) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_templates_embed_close_and_rare_words_weigh_more() {
        let docs = ["shop: Connection refused", "shop: read error on connection to <ip>", "GET /a OK", "GET /b OK"];
        let e = Embedder::fit(DIM, docs);
        let refused = e.embed("shop: Connection refused");
        let lost = e.embed("shop: Connection lost");
        let get = e.embed("GET /c OK");
        assert!(cosine(&refused, &lost) > cosine(&refused, &get));
        assert!((refused.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(e.embed("<*> <*>"), vec![0.0; DIM]);
        // Deterministic: the same text, the same vector, in every process.
        assert_eq!(Embedder::fit(DIM, docs).embed("GET /a OK"), e.embed("GET /a OK"));
    }
}
