//! What a client may read and write: Mosquitto's `acl_file` (read as Mosquitto 2 reads it and
//! decided as Mosquitto 2 decides), plus the topic filters a client's own credentials grant.
//!
//! The file: `topic [read|write|readwrite|deny] FILTER` lines apply to clients without a user
//! name until a `user NAME` line, then to that user; `pattern [access] FILTER` lines apply to
//! every client with `%c` (client id) and `%u` (user name) substituted. A topic is decided by
//! the first rule that matches it and either denies or grants the access asked for; `deny`
//! rules come first, the user's rules before the patterns. Once an ACL is configured, what no
//! rule allows is denied (an empty file denies everything: CVE-2018-12550); a client id or
//! user name containing `+` or `#` gets nothing from the patterns (CVE-2017-7650); a topic
//! starting with `$` is matched only by a rule that starts with `$`.
//!
//! A [`ClientAcl`] is one connection's view: its user's rules, its grants and the patterns,
//! with the decisions it has made cached, so that a busy client costs a hash lookup per
//! message whatever the size of the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::mqtt::topic;

/// Why an ACL file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line is not an ACL rule.
    #[error("{path}, line {line}: {why}")]
    Line {
        path: PathBuf,
        line: usize,
        why: String,
    },
}

/// What a client asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Receive messages published to it (SUBSCRIBE, delivery, retained messages).
    Read,
    /// Publish to it (PUBLISH, the will).
    Write,
}

impl Access {
    fn bit(self) -> u8 {
        match self {
            Self::Read => READ,
            Self::Write => WRITE,
        }
    }
}

const READ: u8 = 1;
const WRITE: u8 = 2;

/// One rule: a topic filter and what it allows (nothing: `deny`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    filter: Box<str>,
    allows: u8,
}

impl Rule {
    fn is_deny(&self) -> bool {
        self.allows == 0
    }
}

/// A `pattern` rule: its filter still holds `%c` and `%u`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    rule: Rule,
    /// It contains `%u`: it never applies to a client without a user name.
    uses_username: bool,
}

/// A parsed ACL file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AclFile {
    /// The rules before any `user` line: for clients without a user name.
    anonymous: Option<Arc<[Rule]>>,
    /// The rules of each `user` block (blocks of one user are joined).
    users: HashMap<Box<str>, Arc<[Rule]>>,
    /// The `pattern` rules, for every client.
    patterns: Arc<[Pattern]>,
    /// Rules in the file.
    rules: usize,
}

impl AclFile {
    /// Reads and parses `path` (blocking).
    pub fn load(path: &Path) -> Result<Self, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, why)| AclError::Line {
            path: path.to_owned(),
            line,
            why,
        })
    }

    /// Parses the text of an ACL file; a bad line gives its number (from 1) and what is wrong.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        // Rules in file order per owner; deny rules are moved first below, as Mosquitto does.
        let mut anonymous: Option<Vec<Rule>> = None;
        let mut users: HashMap<Box<str>, Vec<Rule>> = HashMap::new();
        let mut patterns: Vec<Pattern> = Vec::new();
        let mut user: Option<Box<str>> = None;
        let mut rules = 0;
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim_end();
            if line.starts_with('#') {
                continue;
            }
            // Mosquitto splits on spaces only (a tab is part of a word).
            let line = line.trim_start_matches(' ');
            if line.is_empty() {
                continue;
            }
            let (keyword, rest) = line.split_once(' ').unwrap_or((line, ""));
            let rest = rest.trim_start_matches(' ');
            match keyword {
                "topic" | "pattern" => {
                    let (allows, filter) = access_and_filter(rest).map_err(|why| (number, why))?;
                    if !topic::valid_topic_filter(filter, usize::MAX) {
                        return Err((
                            number,
                            format!("{keyword}: {filter:?} is not a valid topic filter"),
                        ));
                    }
                    let rule = Rule {
                        filter: filter.into(),
                        allows,
                    };
                    rules += 1;
                    if keyword == "pattern" {
                        patterns.push(Pattern {
                            uses_username: filter.contains("%u"),
                            rule,
                        });
                    } else {
                        match &user {
                            None => anonymous.get_or_insert_with(Vec::new).push(rule),
                            Some(name) => users.entry(name.clone()).or_default().push(rule),
                        }
                    }
                }
                "user" => {
                    let name = rest.trim();
                    if name.is_empty() {
                        return Err((number, "user: the user name is missing".into()));
                    }
                    user = Some(name.into());
                }
                _ => {
                    return Err((
                        number,
                        format!(
                            "{:?} is not a rule (valid lines: `topic [read|write|readwrite|deny] \
                             FILTER`, `pattern [read|write|readwrite|deny] FILTER`, `user NAME`, \
                             `# comment`)",
                            keyword.escape_debug().to_string()
                        ),
                    ))
                }
            }
        }
        Ok(Self {
            anonymous: anonymous.map(denies_first),
            users: users
                .into_iter()
                .map(|(name, rules)| (name, denies_first(rules)))
                .collect(),
            patterns: {
                let (mut deny, allow): (Vec<_>, Vec<_>) =
                    patterns.into_iter().partition(|p| p.rule.is_deny());
                deny.extend(allow);
                deny.into()
            },
            rules,
        })
    }

    /// Rules in the file.
    pub fn rules(&self) -> usize {
        self.rules
    }

    /// The rules of the client with user name `username` (or without one).
    fn user_rules(&self, username: Option<&str>) -> Option<&Arc<[Rule]>> {
        match username {
            None => self.anonymous.as_ref(),
            Some(name) => self.users.get(name),
        }
    }
}

/// `[access] FILTER` of a `topic` or `pattern` line.
fn access_and_filter(rest: &str) -> Result<(u8, &str), String> {
    if rest.trim().is_empty() {
        return Err("the topic filter is missing".into());
    }
    let (word, filter) = match rest.split_once(' ') {
        Some((word, filter)) if !filter.trim().is_empty() => (Some(word), filter.trim()),
        _ => (None, rest.trim()),
    };
    let allows = match word {
        None => READ | WRITE,
        Some("read") => READ,
        Some("write") => WRITE,
        Some("readwrite") => READ | WRITE,
        Some("deny") => 0,
        Some(other) => {
            return Err(format!(
                "{:?} is not an access (valid: read, write, readwrite, deny)",
                other.escape_debug().to_string()
            ))
        }
    };
    Ok((allows, filter))
}

/// Mosquitto checks a user's (and the patterns') deny rules before the others.
fn denies_first(rules: Vec<Rule>) -> Arc<[Rule]> {
    let (mut deny, allow): (Vec<_>, Vec<_>) = rules.into_iter().partition(Rule::is_deny);
    deny.extend(allow);
    deny.into()
}

/// The ACL file in force, if one is configured; replaced on reload.
pub struct Acl {
    path: Option<PathBuf>,
    file: RwLock<Option<Arc<AclFile>>>,
}

impl Acl {
    /// The ACL `path` names (read now, blocking: at start), or none.
    pub fn new(path: Option<&Path>) -> Result<Self, AclError> {
        let file = match path {
            Some(path) => Some(Arc::new(AclFile::load(path)?)),
            None => None,
        };
        Ok(Self {
            path: path.map(Path::to_owned),
            file: RwLock::new(file),
        })
    }

    /// No ACL file.
    pub fn none() -> Self {
        Self {
            path: None,
            file: RwLock::new(None),
        }
    }

    /// Reads the file again; on failure the one in force stays. Blocking. `Ok(None)` when no
    /// file is configured, else the rules in the new file.
    pub fn reload(&self) -> Result<Option<usize>, AclError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let file = AclFile::load(path)?;
        let rules = file.rules();
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(file));
        Ok(Some(rules))
    }

    /// The file in force.
    pub fn file(&self) -> Option<Arc<AclFile>> {
        self.file.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The view of the client `client_id` with user name `username` and the topic filters its
    /// credentials grant; `None` when nothing restricts it (no file, no grants).
    pub fn client(
        &self,
        client_id: &str,
        username: Option<&str>,
        publish: &[Box<str>],
        subscribe: &[Box<str>],
    ) -> Option<Arc<ClientAcl>> {
        ClientAcl::new(self.file(), client_id, username, publish, subscribe).map(Arc::new)
    }
}

/// Decisions one client remembers at most; then they are forgotten and made again.
const CACHE_ENTRIES: usize = 256;
/// Topic bytes one client's remembered decisions hold at most (longer topics are decided
/// every time): the cache stays within some tens of KiB whatever the client sends.
const CACHE_TOPIC_BYTES: usize = 16 * 1024;
/// Longest topic whose decision is remembered.
const CACHE_TOPIC_MAX: usize = 256;

/// What a SUBSCRIBE to a filter gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    /// No topic of the filter may be read: SUBACK 0x80.
    Denied,
    /// Every topic of the filter may be read.
    Allowed,
    /// Some topics may be read, some not: granted, and each message is checked on delivery.
    Checked,
}

/// One client's rules: what its user's block, its grants and the patterns allow it.
#[derive(Debug)]
pub struct ClientAcl {
    /// Its user name, to find its rules again when the file is reloaded.
    username: Option<Box<str>>,
    /// Its user's rules in the file (denies first).
    user: Option<Arc<[Rule]>>,
    /// The topic filters its credentials grant (allow only).
    grants: Vec<Rule>,
    /// The patterns with its client id and user name substituted (denies first); empty when
    /// its id or name holds a wildcard and `patterns_refused` is set instead.
    patterns: Vec<Rule>,
    /// The file has patterns and the client id or user name holds `+` or `#`: what the user's
    /// rules and grants do not allow is denied, whatever the patterns say.
    patterns_refused: bool,
    /// Decisions made, by topic.
    cache: Mutex<Decisions>,
}

/// Topic -> decisions made (bit 0/1: read known/allowed, bit 2/3: write known/allowed), and
/// the topic bytes held.
#[derive(Debug, Default)]
struct Decisions {
    topics: HashMap<Box<str>, u8>,
    bytes: usize,
}

impl ClientAcl {
    /// What these rules were made for: the user name, and the topic filters the credentials
    /// grant to publish and to subscribe (what [`Acl::client`] was given), so that they can be
    /// made again (for a persistent session restored at start).
    pub fn login(&self) -> (Option<&str>, Vec<Box<str>>, Vec<Box<str>>) {
        let granted = |allows| {
            self.grants
                .iter()
                .filter(|r| r.allows == allows)
                .map(|r| r.filter.clone())
                .collect()
        };
        (self.username.as_deref(), granted(WRITE), granted(READ))
    }

    fn new(
        file: Option<Arc<AclFile>>,
        client_id: &str,
        username: Option<&str>,
        publish: &[Box<str>],
        subscribe: &[Box<str>],
    ) -> Option<Self> {
        let mut grants: Vec<Rule> = Vec::with_capacity(publish.len() + subscribe.len());
        for (filters, allows) in [(publish, WRITE), (subscribe, READ)] {
            grants.extend(filters.iter().map(|f| Rule {
                filter: f.clone(),
                allows,
            }));
        }
        Self::with_grants(file, client_id, username, grants)
    }

    /// The client's rules: its user's and the patterns from `file`, and `grants`.
    fn with_grants(
        file: Option<Arc<AclFile>>,
        client_id: &str,
        username: Option<&str>,
        grants: Vec<Rule>,
    ) -> Option<Self> {
        if file.is_none() && grants.is_empty() {
            return None;
        }
        let (user, patterns, patterns_refused) = match &file {
            None => (None, Vec::new(), false),
            Some(file) => {
                let dangerous = client_id.contains(['+', '#'])
                    || username.is_some_and(|u| u.contains(['+', '#']));
                let refused = dangerous && !file.patterns.is_empty();
                let patterns = if refused {
                    Vec::new()
                } else {
                    file.patterns
                        .iter()
                        .filter(|p| !p.uses_username || username.is_some())
                        .map(|p| Rule {
                            filter: substitute(&p.rule.filter, client_id, username),
                            allows: p.rule.allows,
                        })
                        .collect()
                };
                (file.user_rules(username).cloned(), patterns, refused)
            }
        };
        Some(Self {
            username: username.map(Into::into),
            user,
            grants,
            patterns,
            patterns_refused,
            cache: Mutex::new(Decisions::default()),
        })
    }

    /// The same client's rules under the ACL file `file` (after a reload): its user's rules
    /// and the patterns come from `file`, its grants stay.
    pub fn renewed(&self, file: Option<Arc<AclFile>>, client_id: &str) -> Option<Arc<Self>> {
        Self::with_grants(
            file,
            client_id,
            self.username.as_deref(),
            self.grants.clone(),
        )
        .map(Arc::new)
    }

    /// Every rule in the order they are tried; `None` marks the end of what may be tried
    /// (the patterns are refused to this client).
    fn rules(&self) -> impl Iterator<Item = Option<&Rule>> {
        let user = self.user.iter().flat_map(|r| r.iter());
        let end = self.patterns_refused.then_some(None);
        user.chain(self.grants.iter())
            .map(Some)
            .chain(end)
            .chain(self.patterns.iter().map(Some))
    }

    /// Whether the client may `access` the topic name `topic`; decided once, then remembered.
    pub fn allows(&self, access: Access, topic: &str) -> bool {
        let (known, allowed) = match access {
            Access::Read => (1u8, 2u8),
            Access::Write => (4u8, 8u8),
        };
        if topic.len() > CACHE_TOPIC_MAX {
            return self.decide(access, topic);
        }
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(bits) = cache.topics.get(topic) {
                if bits & known != 0 {
                    return bits & allowed != 0;
                }
            }
        }
        let decision = self.decide(access, topic);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if !cache.topics.contains_key(topic)
            && (cache.topics.len() >= CACHE_ENTRIES
                || cache.bytes + topic.len() > CACHE_TOPIC_BYTES)
        {
            *cache = Decisions::default();
        }
        let Decisions { topics, bytes } = &mut *cache;
        let bits = topics.entry(topic.into()).or_insert_with(|| {
            *bytes += topic.len();
            0
        });
        *bits |= known | if decision { allowed } else { 0 };
        decision
    }

    /// The decision for `topic`, as Mosquitto 2 makes it.
    fn decide(&self, access: Access, topic: &str) -> bool {
        for rule in self.rules() {
            let Some(rule) = rule else { return false };
            // A topic starting with '$' is matched only by a rule starting with '$'.
            if topic.starts_with('$') && !rule.filter.starts_with('$') {
                continue;
            }
            if topic::matches(&rule.filter, topic) {
                if rule.is_deny() {
                    return false;
                }
                if rule.allows & access.bit() != 0 {
                    return true;
                }
            }
        }
        false
    }

    /// What a SUBSCRIBE to the (valid) topic filter `filter` gets.
    pub fn subscription(&self, filter: &str) -> Subscription {
        if !filter.contains(['+', '#']) {
            return if self.allows(Access::Read, filter) {
                Subscription::Allowed
            } else {
                Subscription::Denied
            };
        }
        // Rules that decide some of the filter's topics before a rule decides all of them.
        let (mut some_allowed, mut some_denied) = (false, false);
        for rule in self.rules() {
            let Some(rule) = rule else { break };
            if !rule.is_deny() && rule.allows & READ == 0 {
                continue;
            }
            if !intersects(&rule.filter, filter) {
                continue;
            }
            let all = covers(&rule.filter, filter);
            match (rule.is_deny(), all) {
                (true, true) => break,
                (true, false) => some_denied = true,
                (false, true) if some_denied => return Subscription::Checked,
                (false, true) => return Subscription::Allowed,
                (false, false) => some_allowed = true,
            }
        }
        if some_allowed {
            Subscription::Checked
        } else {
            Subscription::Denied
        }
    }
}

/// `filter` with `%c` replaced by the client id and `%u` by the user name (if any), as
/// Mosquitto substitutes them.
fn substitute(filter: &str, client_id: &str, username: Option<&str>) -> Box<str> {
    let mut out = String::with_capacity(filter.len() + client_id.len());
    let mut rest = filter;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        match (after.as_bytes().first(), username) {
            (Some(b'c'), _) => {
                out.push_str(client_id);
                rest = &after[1..];
            }
            (Some(b'u'), Some(user)) => {
                out.push_str(user);
                rest = &after[1..];
            }
            _ => {
                out.push('%');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.into()
}

/// Whether the first level of a filter only matches topics that do not start with '$'.
fn wildcard_first(filter: &str) -> bool {
    filter.starts_with(['+', '#'])
}

/// Whether some topic matches both filters.
fn intersects(a: &str, b: &str) -> bool {
    // A wildcard first level never matches a '$' topic; a literal '$' level only matches them.
    if (wildcard_first(a) && b.starts_with('$')) || (wildcard_first(b) && a.starts_with('$')) {
        return false;
    }
    let mut a = a.split('/');
    let mut b = b.split('/');
    loop {
        match (a.next(), b.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(x), Some(y)) if x == "+" || y == "+" || x == y => {}
            _ => return false,
        }
    }
}

/// Whether every topic matching `inner` also matches `outer`.
fn covers(outer: &str, inner: &str) -> bool {
    if wildcard_first(outer) && inner.starts_with('$') {
        return false;
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(x), Some(y)) if x == y && y != "+" && y != "#" => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn client(file: &str, id: &str, user: Option<&str>) -> ClientAcl {
        let file = AclFile::parse(file).expect("valid file");
        ClientAcl::new(Some(Arc::new(file)), id, user, &[], &[]).expect("a file restricts")
    }

    #[test]
    fn parses_mosquitto_syntax_and_reports_bad_lines() {
        let file = AclFile::parse(
            "# comment\n\ntopic read public/#\nuser alice\ntopic readwrite alice/#\n\
             topic deny alice/secret\npattern write devices/%c/up\nuser bob\ntopic read bob/x y\ntopic bob/z\n",
        )
        .unwrap();
        assert_eq!(file.rules(), 6);
        assert_eq!(file.anonymous.as_deref().unwrap().len(), 1);
        let alice = file.users.get("alice").unwrap();
        assert!(alice[0].is_deny(), "deny rules first");
        // A filter may contain spaces: the rest of the line.
        assert_eq!(&*file.users.get("bob").unwrap()[0].filter, "bob/x y");
        // Without an access word: readwrite.
        assert_eq!(file.users.get("bob").unwrap()[1].allows, READ | WRITE);
        assert_eq!(
            AclFile::parse("topic read\n").unwrap().anonymous.unwrap()[0],
            Rule {
                filter: "read".into(),
                allows: READ | WRITE
            },
            "as Mosquitto reads it"
        );
        for (text, line) in [
            ("topic read a\nfoo bar\n", 2),
            ("topic\n", 1),
            ("topic reed a/b\n", 1),
            ("user\n", 1),
            ("topic read a/#/b\n", 1),
            ("\ttopic read a\n", 1),
        ] {
            assert_eq!(AclFile::parse(text).unwrap_err().0, line, "{text:?}");
        }
    }

    #[test]
    fn empty_file_denies_everything() {
        let acl = client("# nothing\n", "c", Some("u"));
        assert!(!acl.allows(Access::Read, "a"));
        assert!(!acl.allows(Access::Write, "a"));
        assert_eq!(acl.subscription("#"), Subscription::Denied);
    }

    #[test]
    fn first_matching_rule_decides_and_denies_come_first() {
        let file = "user u\ntopic read a/#\ntopic write a/w\ntopic deny a/secret\n";
        let acl = client(file, "c", Some("u"));
        assert!(acl.allows(Access::Read, "a/x"));
        assert!(!acl.allows(Access::Write, "a/x"));
        assert!(
            acl.allows(Access::Write, "a/w"),
            "a read rule does not stop the search"
        );
        assert!(
            !acl.allows(Access::Read, "a/secret"),
            "deny before the earlier allow"
        );
        assert!(!acl.allows(Access::Read, "b"));
        // Another user, and no user name: nothing.
        assert!(!client(file, "c", Some("v")).allows(Access::Read, "a/x"));
        assert!(!client(file, "c", None).allows(Access::Read, "a/x"));
    }

    #[test]
    fn patterns_substitute_and_refuse_wildcard_ids() {
        let file = "pattern readwrite devices/%c/#\npattern read users/%u/#\n";
        let acl = client(file, "dev1", Some("alice"));
        assert!(acl.allows(Access::Write, "devices/dev1/up"));
        assert!(!acl.allows(Access::Write, "devices/dev2/up"));
        assert!(acl.allows(Access::Read, "users/alice/x"));
        // CVE-2017-7650: an id or name with a wildcard gets nothing from patterns.
        for (id, user) in [("+", Some("alice")), ("#", None), ("ok", Some("a+b"))] {
            let acl = client(file, id, user);
            assert!(!acl.allows(Access::Read, "devices/x/up"), "{id} {user:?}");
            assert!(!acl.allows(Access::Read, "users/a+b/x"), "{id} {user:?}");
            assert_eq!(acl.subscription("devices/#"), Subscription::Denied);
        }
        // %u never applies to a client without a user name.
        assert!(!client(file, "c", None).allows(Access::Read, "users//x"));
        assert!(client(file, "c", None).allows(Access::Read, "devices/c/x"));
    }

    #[test]
    fn dollar_topics_need_explicit_rules() {
        let acl = client("topic read #\ntopic read +/x\n", "c", None);
        assert!(acl.allows(Access::Read, "a/x"));
        assert!(!acl.allows(Access::Read, "$SYS/x"));
        let acl = client("topic read $SYS/#\n", "c", None);
        assert!(acl.allows(Access::Read, "$SYS/broker/uptime"));
        assert_eq!(acl.subscription("$SYS/#"), Subscription::Allowed);
        assert_eq!(acl.subscription("#"), Subscription::Denied);
    }

    #[test]
    fn subscriptions_allowed_checked_or_denied() {
        let file = "user u\ntopic deny a/secret/#\ntopic read a/#\ntopic read b/+/x\n";
        let acl = client(file, "c", Some("u"));
        assert_eq!(acl.subscription("b/+/x"), Subscription::Allowed);
        assert_eq!(acl.subscription("b/1/x"), Subscription::Allowed);
        assert_eq!(acl.subscription("a/secret/#"), Subscription::Denied);
        assert_eq!(acl.subscription("a/+/x"), Subscription::Checked);
        assert_eq!(acl.subscription("a/open/#"), Subscription::Allowed);
        assert_eq!(acl.subscription("#"), Subscription::Checked);
        assert_eq!(acl.subscription("c/#"), Subscription::Denied);
        assert_eq!(acl.subscription("b/#"), Subscription::Checked);
    }

    #[test]
    fn grants_allow_beside_the_file() {
        let acl = ClientAcl::new(None, "c", None, &["up/c".into()], &["down/c/#".into()]).unwrap();
        assert!(acl.allows(Access::Write, "up/c"));
        assert!(!acl.allows(Access::Read, "up/c"));
        assert!(acl.allows(Access::Read, "down/c/1"));
        assert!(!acl.allows(Access::Write, "down/c/1"));
        assert!(ClientAcl::new(None, "c", None, &[], &[]).is_none());
    }

    #[test]
    fn filter_relations() {
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/+/b"));
        assert!(covers("+/b", "x/b"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("#", "$SYS/x"));
        assert!(covers("$SYS/#", "$SYS/+"));
        assert!(intersects("a/+", "+/b"));
        assert!(intersects("a/#", "a"));
        assert!(!intersects("a/b", "a/c"));
        assert!(!intersects("#", "$SYS/x"));
        assert!(!intersects("a/b/c", "a/b"));
        assert!(intersects("+/+", "a/#"));
    }

    #[test]
    fn decisions_are_cached_and_bounded() {
        let acl = client("topic read a/#\n", "c", None);
        for i in 0..(CACHE_ENTRIES * 2) {
            assert!(acl.allows(Access::Read, &format!("a/{i}")));
        }
        assert!(acl.cache.lock().unwrap().topics.len() <= CACHE_ENTRIES);
        // Long topics are decided each time; the bytes held stay bounded.
        let long = format!("a/{}", "x".repeat(CACHE_TOPIC_MAX));
        assert!(acl.allows(Access::Read, &long));
        assert!(!acl.cache.lock().unwrap().topics.contains_key(long.as_str()));
        for i in 0..200 {
            let topic = format!("a/{i:0>200}");
            assert!(acl.allows(Access::Read, &topic));
            assert!(acl.cache.lock().unwrap().bytes <= CACHE_TOPIC_BYTES);
        }
    }
}
