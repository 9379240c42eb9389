//! The retained-subscribe scenario's topics and filters, and how many retained messages each
//! filter matches (pure arithmetic, so the expected total is known without a broker).
//!
//! Retained topic i is `r/<i/1000>/<i%1000>`: groups of 1,000 topics.

/// Topic of retained message `i`.
pub fn retained_topic(i: usize) -> String {
    format!("r/{}/{}", i / 1000, i % 1000)
}

/// The filters of the one big SUBSCRIBE.
#[derive(Debug)]
pub struct FilterPlan {
    pub filters: Vec<String>,
    pub wildcard: usize,
    /// Retained messages a broker sends in answer: the sum over filters of the topics each
    /// matches (MQTT 3.1.1 sends retained messages per subscription, so a topic matched by two
    /// filters comes twice).
    pub expected: u64,
}

/// `count` filters over `retained` topics, `wildcard_share` of them with wildcards.
///
/// Wildcard filters, in this order: `r/<k>/+` for each group k (up to 1,000 matches each),
/// then `r/+/<j>` for each position j in a group (one match per group), then `+/<k>/<j>`
/// (one match each). Exact filters name retained topics spread evenly over all of them; when
/// there are more exact filters than topics, the surplus names topics that do not exist.
/// Every filter is distinct.
pub fn plan(retained: usize, count: usize, wildcard_share: f64) -> FilterPlan {
    let wildcard = ((count as f64 * wildcard_share).round() as usize).min(count);
    let exact = count - wildcard;
    let groups = retained.div_ceil(1000);
    let positions = retained.min(1000);
    let mut filters = Vec::with_capacity(count);
    let mut expected = 0u64;

    for w in 0..wildcard {
        let (filter, matches) = if w < groups {
            (format!("r/{w}/+"), (retained - w * 1000).min(1000))
        } else if w < groups + positions {
            let j = w - groups;
            (format!("r/+/{j}"), (retained - j).div_ceil(1000))
        } else {
            let t = w - groups - positions;
            (
                format!("+/{}/{}", t / 1000, t % 1000),
                usize::from(t < retained),
            )
        };
        filters.push(filter);
        expected += matches as u64;
    }
    for e in 0..exact {
        let i = if exact <= retained {
            e * retained / exact
        } else {
            e
        };
        filters.push(retained_topic(i));
        expected += u64::from(i < retained);
    }
    FilterPlan {
        filters,
        wildcard,
        expected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// MQTT filter matching, enough for the filters above (no `#`, no `$` topics).
    fn matches(filter: &str, topic: &str) -> bool {
        let (f, t): (Vec<_>, Vec<_>) = (filter.split('/').collect(), topic.split('/').collect());
        f.len() == t.len() && f.iter().zip(&t).all(|(f, t)| *f == "+" || f == t)
    }

    fn brute_force(retained: usize, filters: &[String]) -> u64 {
        let topics: Vec<String> = (0..retained).map(retained_topic).collect();
        filters
            .iter()
            .map(|f| topics.iter().filter(|t| matches(f, t)).count() as u64)
            .sum()
    }

    #[test]
    fn expected_count_matches_brute_force() {
        for (retained, count, share) in [
            (2_500, 700, 0.5),
            (2_500, 4_000, 0.9),
            (1_000, 100, 0.1),
            (30, 50, 0.2),
            (3_000, 10, 0.0),
            (3_000, 10, 1.0),
        ] {
            let plan = plan(retained, count, share);
            assert_eq!(plan.filters.len(), count);
            let distinct: HashSet<_> = plan.filters.iter().collect();
            assert_eq!(distinct.len(), count, "filters are distinct");
            assert_eq!(
                plan.expected,
                brute_force(retained, &plan.filters),
                "{retained} {count} {share}"
            );
        }
    }

    #[test]
    fn defaults_give_a_tenth_wildcards() {
        let plan = plan(100_000, 10_000, 0.1);
        assert_eq!(plan.wildcard, 1_000);
        assert_eq!(plan.filters[0], "r/0/+");
        assert_eq!(plan.filters[100], "r/+/0");
        // 100 groups x 1,000 + 900 positions x 100 + 9,000 exact topics.
        assert_eq!(plan.expected, 100_000 + 90_000 + 9_000);
    }
}
