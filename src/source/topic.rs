//! Topic filters: which topics the intake subscribes to, and which topic
//! level of a PUBLISH names its device.

/// Why a topic filter cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("filter {0:?} must have exactly one '+' level (the device id)")]
    DeviceLevel(String),
    #[error("filter {0:?}: '#' may only be the last level")]
    HashNotLast(String),
    #[error("filter {0:?}: wildcards must fill a whole level")]
    PartialWildcard(String),
}

/// A topic filter with one `+` level whose match is the device id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    pub filter: String,
    levels: Vec<String>,
    device_level: usize,
}

impl TopicFilter {
    /// Parses a filter; exactly one level must be `+`, a `#` may only end it.
    ///
    /// # Errors
    /// [`TopicError`] saying what is wrong with the filter.
    pub fn parse(filter: &str) -> Result<TopicFilter, TopicError> {
        let levels: Vec<String> = filter.split('/').map(str::to_string).collect();
        let pluses: Vec<usize> = levels
            .iter()
            .enumerate()
            .filter(|(_, l)| l.as_str() == "+")
            .map(|(i, _)| i)
            .collect();
        if pluses.len() != 1 {
            return Err(TopicError::DeviceLevel(filter.to_string()));
        }
        for (i, level) in levels.iter().enumerate() {
            if level == "#" && i + 1 != levels.len() {
                return Err(TopicError::HashNotLast(filter.to_string()));
            }
            if level != "+" && level != "#" && (level.contains('+') || level.contains('#')) {
                return Err(TopicError::PartialWildcard(filter.to_string()));
            }
        }
        Ok(TopicFilter {
            filter: filter.to_string(),
            levels,
            device_level: pluses[0],
        })
    }

    /// The device id if `topic` matches this filter.
    pub fn device_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let mut device = None;
        let mut parts = topic.split('/');
        for (i, level) in self.levels.iter().enumerate() {
            if level == "#" {
                return device;
            }
            let part = parts.next()?;
            if i == self.device_level {
                if part.is_empty() {
                    return None;
                }
                device = Some(part);
            } else if level != part {
                return None;
            }
        }
        match parts.next() {
            None => device,
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_extract_devices() {
        let f = TopicFilter::parse("devices/+/telemetry").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.device_of("devices/d1/telemetry"), Some("d1"));
        assert_eq!(f.device_of("devices//telemetry"), None);
        assert_eq!(f.device_of("devices/d1/other"), None);
        assert_eq!(f.device_of("devices/d1/telemetry/x"), None);
        let g = TopicFilter::parse("site/+/#").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(g.device_of("site/d2/a/b"), Some("d2"));
        assert!(TopicFilter::parse("a/+/+").is_err());
        assert_eq!(
            TopicFilter::parse("a/#/b/+"),
            Err(TopicError::HashNotLast("a/#/b/+".into()))
        );
        assert!(matches!(
            TopicFilter::parse("a/x+/+"),
            Err(TopicError::PartialWildcard(_))
        ));
    }
}
