//! The metric names and units of one payload, each allocated once.
//!
//! A pack repeats a few names over many records (100 samples x 2 metrics
//! name 2 series), so the decoders hand every reading a shared
//! [`Arc<str>`] instead of a `String` of its own: one allocation a name a
//! message instead of one a reading, and a name is checked (valid, clean,
//! within its limit) once, when first seen. The table lives for one payload
//! and keeps at most [`Names::MAX`] entries, so a payload of many distinct
//! names costs what it did before and never more.

use std::sync::Arc;

/// The distinct texts seen so far in one payload, most recent last.
#[derive(Debug, Default)]
pub struct Names {
    seen: Vec<Arc<str>>,
}

impl Names {
    /// Most entries kept: past this, new texts are still returned, only not
    /// remembered.
    pub const MAX: usize = 16;

    /// The kept text equal to `prefix` followed by `rest`, if any; compared
    /// without building the joined text.
    #[inline]
    pub fn find(&self, prefix: &str, rest: &str) -> Option<Arc<str>> {
        let len = prefix.len() + rest.len();
        self.seen
            .iter()
            .rev()
            .find(|s| {
                let s = s.as_bytes();
                s.len() == len
                    && s[..prefix.len()] == *prefix.as_bytes()
                    && s[prefix.len()..] == *rest.as_bytes()
            })
            .cloned()
    }

    /// Keeps `text` (already checked by the caller) while there is room,
    /// and returns it.
    pub fn keep(&mut self, text: Arc<str>) -> Arc<str> {
        if self.seen.len() < Self::MAX {
            self.seen.push(text.clone());
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_joined_texts_and_stays_bounded() {
        let mut names = Names::default();
        assert_eq!(names.find("dev:", "temp"), None);
        let kept = names.keep(Arc::from("dev:temp"));
        let found = names.find("dev:", "temp").unwrap();
        assert!(Arc::ptr_eq(&kept, &found));
        assert!(names.find("", "dev:temp").is_some());
        assert!(names.find("dev", ":temp").is_some());
        assert_eq!(names.find("dev:", "tem"), None);
        assert_eq!(names.find("dev:", "tempx"), None);
        for i in 0..100 {
            names.keep(Arc::from(format!("m{i}")));
        }
        assert_eq!(names.seen.len(), Names::MAX);
        assert!(names.find("", "m14").is_some());
        assert_eq!(names.find("", "m15"), None);
    }
}
