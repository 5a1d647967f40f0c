//! Log templates by Drain (He et al., 2017), through the `logdrain` crate, with afetm's masks
//! and a file that keeps every template's id across restarts.
//!
//! Masks, applied before Drain sees a message: UUIDs (`<uuid>`), IPv4 addresses with an
//! optional port (`<ip>`), hex numbers (`<hex>`), file paths of two or more segments
//! (`<path>`) and decimal numbers (`<num>`). Error codes that are words (`AH01071`) and the
//! access lines' status words stay. Drain then generalizes what still varies to `<*>`.

use std::path::{Path, PathBuf};

use logdrain::{FilePersistence, Mask, Miner, Persistence};

use crate::LogsError;

/// A template's id: stable for the life of its store file.
pub type TemplateId = u64;

/// Drain's similarity threshold: a message joins a template when at least this share of its
/// tokens match (Drain3's default is 0.4; 0.5 keeps redis' short start-up lines apart).
pub const SIM_THRESHOLD: f64 = 0.5;

/// The masks, in the order they apply.
pub fn masks() -> Vec<Mask> {
    const M: [(&str, &str); 5] = [
        (r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", "<uuid>"),
        (r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b", "<ip>"),
        (r"\b0x[0-9a-fA-F]+\b", "<hex>"),
        (r"(?:/[\w.\-]+){2,}/?", "<path>"),
        (r"\b\d+(?:\.\d+)?\b", "<num>"),
    ];
    // The patterns are constants: a failure here is a bug caught by the tests.
    M.iter().filter_map(|(p, n)| Mask::new(p, n).ok()).collect()
}

/// The template miner and where it is kept.
pub struct Templates {
    miner: Miner,
    file: Option<PathBuf>,
}

impl Default for Templates {
    fn default() -> Self {
        Templates::new()
    }
}

impl Templates {
    /// An empty miner kept in memory only.
    pub fn new() -> Templates {
        Templates { miner: miner(), file: None }
    }

    /// The miner kept in `file`: its templates are loaded if the file exists, and
    /// [`Templates::save`] writes them back (atomically).
    pub fn open(file: &Path) -> Result<Templates, LogsError> {
        let miner = miner();
        let store = FilePersistence::new(file);
        miner
            .load_state(&store as &dyn Persistence)
            .map_err(|e| LogsError::Store { path: file.display().to_string(), message: e.to_string() })?;
        Ok(Templates { miner, file: Some(file.to_path_buf()) })
    }

    /// Writes the templates to the store file (no-op in memory).
    pub fn save(&self) -> Result<(), LogsError> {
        match &self.file {
            Some(file) => self.save_to(file),
            None => Ok(()),
        }
    }

    /// Writes the templates to `file` (atomically), which becomes their store.
    pub fn save_to(&self, file: &Path) -> Result<(), LogsError> {
        self.miner
            .save_state(&FilePersistence::new(file) as &dyn Persistence)
            .map_err(|e| LogsError::Store { path: file.display().to_string(), message: e.to_string() })
    }

    /// The template of `message`, learning it (a new template, or one generalized) if needed.
    pub fn learn(&self, message: &str) -> TemplateId {
        self.miner.add(message).cluster_id
    }

    /// The template of `message` if one matches, without learning.
    pub fn lookup(&self, message: &str) -> Option<TemplateId> {
        self.miner.match_only(message)
    }

    /// A template's text (`shop: Connection <*>`), if it exists.
    pub fn text(&self, id: TemplateId) -> Option<String> {
        self.miner.cluster(id).map(|c| c.template().to_string())
    }

    /// How many templates there are.
    pub fn len(&self) -> usize {
        self.miner.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.miner.is_empty()
    }
}

fn miner() -> Miner {
    let options = Miner::builder().sim_threshold(SIM_THRESHOLD).depth(4).max_clusters_per_leaf(256).masks(masks());
    // Constant, valid options: `build` fails only on an invalid depth or threshold.
    options.build().unwrap_or_else(|_| Miner::from_options(Default::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_numbers_addresses_and_paths() {
        let t = Templates::new();
        let a = t.learn("read error on connection to 127.0.0.1:21379 after 12 ms");
        let b = t.learn("read error on connection to 10.0.0.7:6379 after 3 ms");
        assert_eq!(a, b);
        assert_eq!(t.text(a).as_deref(), Some("read error on connection to <ip> after <num> ms"));
        let p = t.learn("cannot open /var/lib/redis/dump.rdb at 0x7f3a2b");
        assert_eq!(t.text(p).as_deref(), Some("cannot open <path> at <hex>"));
        // Different events stay apart; a word-like error code is kept.
        let c = t.learn("AH01071: Got error 'Primary script unknown'");
        let d = t.learn("Connection refused");
        assert_ne!(c, d);
        assert_eq!(t.text(c).as_deref(), Some("AH01071: Got error 'Primary script unknown'"));
    }

    #[test]
    fn drain_generalizes_what_varies() {
        let t = Templates::new();
        let a = t.learn("Accepted client alpha on port");
        let b = t.learn("Accepted client beta on port");
        assert_eq!(a, b);
        assert_eq!(t.text(a).as_deref(), Some("Accepted client <*> on port"));
    }

    #[test]
    fn ids_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("templates.bin");
        let t = Templates::open(&file).unwrap();
        let ids: Vec<_> =
            ["shop: Connection refused", "Redis is starting now", "GET /a OK"].iter().map(|m| t.learn(m)).collect();
        t.save().unwrap();
        drop(t);
        let t = Templates::open(&file).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup("shop: Connection refused"), Some(ids[0]));
        assert_eq!(t.lookup("GET /a OK"), Some(ids[2]));
        let new = t.learn("a line never seen before with many words");
        assert!(!ids.contains(&new), "a new template must not reuse an id");
    }
}
