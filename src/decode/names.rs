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

    /// The shared text `prefix` followed by `rest`: the kept one when there
    /// is one, else the joined text, once `check` has taken it (then kept
    /// while there is room).
    ///
    /// # Errors
    /// What `check` returns for a text seen for the first time.
    #[inline]
    pub fn intern<E>(
        &mut self,
        prefix: &str,
        rest: &str,
        check: impl FnOnce(&str) -> Result<(), E>,
    ) -> Result<Arc<str>, E> {
        if let Some(kept) = self.find(prefix, rest) {
            return Ok(kept);
        }
        let mut text = String::with_capacity(prefix.len() + rest.len());
        text.push_str(prefix);
        text.push_str(rest);
        check(&text)?;
        Ok(self.keep(Arc::from(text)))
    }

    /// The kept text equal to `prefix` followed by `rest`, if any; compared
    /// without building the joined text.
    #[inline]
    fn find(&self, prefix: &str, rest: &str) -> Option<Arc<str>> {
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

    /// Keeps `text` while there is room, and returns it.
    fn keep(&mut self, text: Arc<str>) -> Arc<str> {
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
        // A text the check refuses is neither returned nor kept.
        let refused = names.intern("", "bad", |_| Err("refused"));
        assert_eq!(refused, Err("refused"));
        let m3 = names.intern("m", "3", |_| Err("not asked again"));
        assert_eq!(m3.as_deref(), Ok("m3"));
        let fresh = names.intern("", "fresh", |t| {
            if t == "fresh" {
                Ok::<_, ()>(())
            } else {
                Err(())
            }
        });
        assert_eq!(fresh.as_deref(), Ok("fresh"));
        assert_eq!(names.seen.len(), Names::MAX);
        assert!(names.find("", "m14").is_some());
        assert_eq!(names.find("", "m15"), None);
    }
}
