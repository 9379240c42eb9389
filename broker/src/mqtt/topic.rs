//! Topic names and topic filters: validation and matching (MQTT 3.1.1 section 4.7).

/// Topic levels of a topic name or filter (`a/b` has two, `/` has two empty ones).
fn levels(s: &str) -> usize {
    s.bytes().filter(|b| *b == b'/').count() + 1
}

/// A topic name a client may publish to: non-empty, no wildcards, no NUL, at most `max_levels`
/// levels.
pub fn valid_topic_name(topic: &str, max_levels: usize) -> bool {
    !topic.is_empty()
        && topic.len() <= 65_535
        && !topic.contains(['+', '#', '\0'])
        && levels(topic) <= max_levels
}

/// A topic filter a client may subscribe to: non-empty, no NUL, `+` alone in its level, `#` alone
/// in the last level, at most `max_levels` levels.
pub fn valid_topic_filter(filter: &str, max_levels: usize) -> bool {
    if filter.is_empty() || filter.contains('\0') || levels(filter) > max_levels {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        match level {
            "+" => {}
            "#" if is_last => {}
            _ if level.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Whether `topic` matches `filter`. Both must already be valid. Topics that start with `$` are
/// not matched by a filter starting with a wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let ok = |t| valid_topic_name(t, 3);
        assert!(ok("a/b"));
        assert!(ok("/"));
        assert!(ok("bad/id"));
        assert!(ok("a/b/c"));
        assert!(!ok("a/b/c/d"), "more levels than allowed");
        assert!(!ok(""));
        assert!(!ok("a/+"));
        assert!(!ok("a/#"));
        assert!(!ok("a\0b"));
    }

    #[test]
    fn filters() {
        for ok in [
            "#",
            "+",
            "a/+/c",
            "a/#",
            "+/+",
            "/",
            "a//b",
            "$SYS/#",
            "sport/+/player1",
        ] {
            assert!(valid_topic_filter(ok, 3), "{ok}");
        }
        for bad in ["", "a/#/c", "a#", "a/b+", "#/a", "+a", "a\0", "a/b/c/#"] {
            assert!(!valid_topic_filter(bad, 3), "{bad}");
        }
    }

    #[test]
    fn matching() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+/+", "/x", true),
            ("+", "", true),
            ("a/+/c", "a/x/c", true),
            ("a/+/c", "a/x/d", false),
            ("#", "$SYS/uptime", false),
            ("+/uptime", "$SYS/uptime", false),
            ("$SYS/#", "$SYS/uptime", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("sport/tennis/#", "sport/tennis", true),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(matches(filter, topic), expected, "{filter} vs {topic}");
        }
    }
}
