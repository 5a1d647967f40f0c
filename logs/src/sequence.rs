//! A window's log lines as a sequence of log events, the input of the sequence models
//! (Chimera's `x = [e_1, ..., e_n]`, eq. 1).
//!
//! Consecutive lines of one source with one template fold into one event that counts them:
//! a server that fails every request writes the same line hundreds of times, and the model
//! should see that as one event with a large count, not as a window full of copies. A
//! sequence keeps its last [`MAX_EVENTS`] events (where a failure shows) and says how many it
//! left out.

use serde::{Deserialize, Serialize};

use crate::{Embedder, Level, LogLine, Source, TemplateId, Templates};

/// Events kept per sequence (the last ones).
pub const MAX_EVENTS: usize = 64;

/// Consecutive lines of one source and template.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The template.
    pub template: TemplateId,
    /// Its text when the event was built.
    pub text: String,
    /// The first of its lines as written.
    pub example: String,
    /// Its source.
    pub source: Source,
    /// The highest level among its lines.
    pub level: Level,
    /// How many lines it folds.
    pub count: u32,
    /// Time of its first line, Unix ms, if known.
    pub unix_ms: Option<i64>,
}

/// A window's events in time order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sequence {
    /// The events kept.
    pub events: Vec<Event>,
    /// Events left out at the start (over [`MAX_EVENTS`]).
    pub dropped: usize,
}

/// The event of a line no frozen template matches ([`Sequence::frozen`]).
pub const UNKNOWN_TEMPLATE: TemplateId = TemplateId::MAX;
/// Its text, as the embedder sees it.
pub const UNKNOWN_TEXT: &str = "<unknown-template>";

/// Consecutive lines of one template and source as one event (texts filled in later).
fn fold(lines: &[LogLine], mut template_of: impl FnMut(&str) -> TemplateId) -> Vec<Event> {
    let mut events: Vec<Event> = Vec::new();
    for l in lines {
        let template = template_of(&l.message);
        match events.last_mut() {
            Some(e) if e.template == template && e.source == l.source => {
                e.count += 1;
                e.level = e.level.max(l.level);
            }
            _ => events.push(Event {
                template,
                text: String::new(),
                example: l.raw.clone(),
                source: l.source,
                level: l.level,
                count: 1,
                unix_ms: l.unix_ms,
            }),
        }
    }
    events
}

impl Sequence {
    /// Folds `lines` (in time order) into events, learning their templates (Drain is online):
    /// what training reads.
    pub fn build(lines: &[LogLine], templates: &Templates) -> Sequence {
        let events = fold(lines, |m| templates.learn(m));
        // Texts last: a template may have been generalized by a later line.
        Sequence::keep(events, |id| templates.text(id).unwrap_or_default())
    }

    /// Folds `lines` against templates frozen after training: a message no template matches
    /// (by Drain's own similarity rule, read-only) becomes the event [`UNKNOWN_TEMPLATE`] (text [`UNKNOWN_TEXT`]), and no template learns
    /// or generalizes. What scoring and serving read, so that a model is judged on the
    /// templates it was trained with.
    pub fn frozen(lines: &[LogLine], templates: &Templates) -> Sequence {
        let events = fold(lines, |m| templates.lookup(m).unwrap_or(UNKNOWN_TEMPLATE));
        Sequence::keep(events, |id| match id {
            UNKNOWN_TEMPLATE => UNKNOWN_TEXT.to_string(),
            id => templates.text(id).unwrap_or_default(),
        })
    }

    fn keep(mut events: Vec<Event>, text: impl Fn(TemplateId) -> String) -> Sequence {
        for e in &mut events {
            e.text = text(e.template);
        }
        let dropped = events.len().saturating_sub(MAX_EVENTS);
        Sequence { events: events.split_off(dropped), dropped }
    }

    /// Width of one event's features with `embedder`.
    pub fn width(embedder: &Embedder) -> usize {
        embedder.dim + 3 + Source::ALL.len() + 1
    }

    /// Each event's features: the template's embedding, the level and the source one-hot, and
    /// `ln(1 + count) / 5`.
    pub fn features(&self, embedder: &Embedder) -> Vec<Vec<f32>> {
        self.events
            .iter()
            .map(|e| {
                let mut f = embedder.embed(&e.text);
                let level = [Level::Info, Level::Warning, Level::Error].map(|l| (l == e.level) as u8 as f32);
                f.extend(level);
                f.extend(Source::ALL.map(|s| (s == e.source) as u8 as f32));
                f.push((1.0 + e.count as f32).ln() / 5.0);
                f
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::lines_of;

    #[test]
    fn repeats_fold_into_one_event() {
        let php: String =
            (0..50).map(|i| format!("[29-Nov-2026 01:25:{:02} UTC] shop: Connection refused\n", i % 60)).collect();
        let logs = vec![
            ("redis.log".to_string(), "1:C 29 Nov 2026 01:24:00.000 # Configuration loaded\n".to_string()),
            ("php-error.log".to_string(), php),
        ];
        let t = Templates::new();
        let s = Sequence::build(&lines_of(&logs), &t);
        assert_eq!(s.events.len(), 2);
        assert_eq!((s.events[1].count, s.events[1].level), (50, Level::Error));
        assert_eq!(s.events[1].text, "shop: Connection refused");
        let e = Embedder::default();
        let f = s.features(&e);
        assert_eq!(f[0].len(), Sequence::width(&e));
    }

    #[test]
    fn frozen_templates_learn_nothing_and_map_new_lines_to_unknown() {
        let php = |msg: &str| vec![("php-error.log".to_string(), format!("[29-Nov-2026 01:25:00 UTC] {msg}\n"))];
        let t = Templates::new();
        Sequence::build(&lines_of(&php("shop: Connection refused by redis")), &t);
        let before = t.len();
        let s = Sequence::frozen(&lines_of(&php("shop: Connection refused by redis")), &t);
        assert_eq!(s.events[0].text, "shop: Connection refused by redis");
        let known = s.events[0].template;
        // Similar enough by Drain's rule: the trained template, which learning would have
        // generalized to `Connection <*> by redis`; frozen, it stays as trained.
        let s = Sequence::frozen(&lines_of(&php("shop: Connection reset by redis")), &t);
        assert_eq!((s.events[0].template, s.events[0].text.as_str()), (known, "shop: Connection refused by redis"));
        let s = Sequence::frozen(&lines_of(&php("kernel: something else entirely happened")), &t);
        assert_eq!((s.events[0].template, s.events[0].text.as_str()), (UNKNOWN_TEMPLATE, UNKNOWN_TEXT));
        assert_eq!(t.len(), before, "no template was added");
        let learnt = Sequence::build(&lines_of(&php("shop: Connection reset by redis")), &t);
        assert_eq!(learnt.events[0].text, "shop: Connection <*> by redis", "what learning would have done");
    }
}
