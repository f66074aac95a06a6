//! Checking a configuration file for every problem at once: each unknown key (with a "did you
//! mean" among the keys its table knows), each value of the wrong type, each missing
//! environment variable and each inconsistency, named by line and full dotted key.
//!
//! The typed parse (serde) stays the only schema, so a new setting needs no second list here:
//! a failed parse's error is located in the spanned document, recorded, and the offending key
//! is taken out before parsing again, until the rest parses. Semantic checks then run on what
//! parsed.

use std::fmt;

use serde::Deserialize;
use toml::de::{DeTable, DeValue, Deserializer};
use toml::Spanned;

use super::Config;

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySegment {
    /// A key of a table.
    Key(String),
    /// An element of an array (`[[auth.static_keys]]`).
    Index(usize),
}

/// A key's full path from the top of the file: `providers.mock.tokenz`,
/// `auth.static_keys[0].key`, `pricing."openai/gpt-4o"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<KeySegment>);

impl KeyPath {
    /// The top of the file (a problem of no particular key).
    pub fn root() -> Self {
        Self::default()
    }

    /// This path, one table key deeper.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.0.push(KeySegment::Key(key.into()));
        self
    }

    /// This path, one array element deeper.
    pub fn index(mut self, index: usize) -> Self {
        self.0.push(KeySegment::Index(index));
        self
    }

    /// True for the top of the file.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    fn starts_with(&self, prefix: &KeyPath) -> bool {
        self.0.starts_with(&prefix.0)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                KeySegment::Key(k) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(k)?;
                    } else {
                        write!(f, "{k:?}")?;
                    }
                }
                KeySegment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// One thing wrong with a configuration: where (line, when known, and key) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// 1-based line in the file, when the problem sits at one.
    pub line: Option<usize>,
    /// The key it concerns (root for the file as a whole).
    pub key: KeyPath,
    /// What is wrong, without the key.
    pub message: String,
}

impl ConfigProblem {
    /// A problem of `key` whose line is found later (or never, for a configuration not read
    /// from a file).
    pub fn at(key: KeyPath, message: impl Into<String>) -> Self {
        Self {
            line: None,
            key,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.key.is_root() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Parses `text` (before `${VAR}` interpolation: messages quote the file as written, never a
/// secret from the environment), then the interpolated text, then checks what parsed.
/// Returns the configuration, or every problem found, in line order.
pub(super) fn check_text(text: &str) -> Result<Config, Vec<ConfigProblem>> {
    let raw = match DeTable::parse(text) {
        Ok(root) => root,
        // A syntax error leaves no document to walk: it is the one problem reported.
        Err(e) => {
            return Err(vec![ConfigProblem {
                line: e.span().map(|s| line_of(text, s.start)),
                key: KeyPath::root(),
                message: e.message().trim().to_string(),
            }])
        }
    };
    let mut problems = Vec::new();
    let removed = parse_pruned(text, raw.clone(), &mut problems);

    let (expanded, missing) = super::load::interpolate(text);
    for (line, var) in missing {
        problems.push(ConfigProblem {
            line: Some(line),
            key: key_on_line(raw.get_ref(), text, line),
            message: format!("environment variable {var} is not set"),
        });
    }
    // Where the interpolated text fails to parse: (line, key), when the error has a place.
    let config = match DeTable::parse(&expanded) {
        Ok(mut root) => {
            for path in &removed {
                remove(root.get_mut(), path);
            }
            let located = root.clone();
            Config::deserialize(Deserializer::from(root)).map_err(|e| {
                e.span().map(|s| {
                    (
                        line_of(&expanded, s.start),
                        locate(located.get_ref(), s.start),
                    )
                })
            })
        }
        Err(e) => Err(e
            .span()
            .map(|s| (line_of(&expanded, s.start), KeyPath::root()))),
    };
    match config {
        Ok(config) => {
            for mut p in config.problems() {
                p.line = line_of_key(raw.get_ref(), text, &p.key);
                problems.push(p);
            }
            if problems.is_empty() {
                return Ok(config);
            }
        }
        // Only a value that came from the environment can fail here (the file as written
        // parsed): say where, never what the value was.
        Err(place) if problems.is_empty() => {
            let (line, key) = match place {
                Some((line, key)) => (Some(line), key),
                None => (None, KeyPath::root()),
            };
            problems.push(ConfigProblem {
                line,
                key,
                message: "a value taken from the environment does not fit here".into(),
            });
        }
        Err(_) => {}
    }
    problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
    Err(problems)
}

/// Parses `root` into a [`Config`] again and again, each time recording the error and taking
/// out the key it names, until it parses or no key can be taken out. Returns the keys taken out.
fn parse_pruned(
    text: &str,
    mut root: Spanned<DeTable<'_>>,
    problems: &mut Vec<ConfigProblem>,
) -> Vec<KeyPath> {
    let mut removed: Vec<KeyPath> = Vec::new();
    // Each round takes out one key, so this bounds the rounds by the file's size.
    for _ in 0..=text.len() {
        let Err(e) = Config::deserialize(Deserializer::from(root.clone())) else {
            break;
        };
        let Some(at) = e.span().map(|s| s.start) else {
            problems.push(ConfigProblem::at(KeyPath::root(), e.message().trim()));
            break;
        };
        let key = locate(root.get_ref(), at);
        let message = e.message().trim().to_string();
        // A required key taken out for its own error is not missing a second time.
        let follows_removal = missing_field(&message)
            .map(|field| removed.contains(&key.clone().key(field)))
            .unwrap_or(false);
        if !follows_removal {
            problems.push(ConfigProblem {
                line: Some(line_of(text, at)),
                key: key.clone(),
                message: explain(&message),
            });
        }
        let target = removable(&key);
        if target.is_root() || !remove(root.get_mut(), &target) {
            break;
        }
        removed.retain(|r| !r.starts_with(&target));
        removed.push(target);
    }
    removed
}

/// The deepest key whose name or value covers byte `at`.
fn locate(root: &DeTable<'_>, at: usize) -> KeyPath {
    let mut best = KeyPath::root();
    let mut path = KeyPath::root();
    find_in_table(root, at, &mut path, &mut best);
    best
}

fn covers(span: std::ops::Range<usize>, at: usize) -> bool {
    span.start <= at && at < span.end.max(span.start + 1)
}

fn find_in_table(table: &DeTable<'_>, at: usize, path: &mut KeyPath, best: &mut KeyPath) {
    for (k, v) in table.iter() {
        path.0.push(KeySegment::Key(k.get_ref().to_string()));
        if (covers(k.span(), at) || covers(v.span(), at)) && path.0.len() > best.0.len() {
            *best = path.clone();
        }
        find_in_value(v, at, path, best);
        path.0.pop();
    }
}

fn find_in_value(v: &Spanned<DeValue<'_>>, at: usize, path: &mut KeyPath, best: &mut KeyPath) {
    match v.get_ref() {
        DeValue::Table(t) => find_in_table(t, at, path, best),
        DeValue::Array(a) => {
            for (i, e) in a.iter().enumerate() {
                path.0.push(KeySegment::Index(i));
                if covers(e.span(), at) && path.0.len() > best.0.len() {
                    *best = path.clone();
                }
                find_in_value(e, at, path, best);
                path.0.pop();
            }
        }
        _ => {}
    }
}

/// What can be taken out for an error at `key`: the key itself, or the array holding the
/// element (array elements cannot be taken out one by one).
fn removable(key: &KeyPath) -> KeyPath {
    let mut target = key.clone();
    while matches!(target.0.last(), Some(KeySegment::Index(_))) {
        target.0.pop();
    }
    target
}

/// Takes out the key at `path` (which ends in a table key); false when there is none.
fn remove(root: &mut DeTable<'_>, path: &KeyPath) -> bool {
    let Some((KeySegment::Key(last), parents)) = path.0.split_last() else {
        return false;
    };
    let mut table = root;
    let mut segments = parents.iter().peekable();
    while let Some(segment) = segments.next() {
        let KeySegment::Key(k) = segment else {
            return false;
        };
        let Some(mut value) = table.get_mut(k.as_str()).map(|v| v.get_mut()) else {
            return false;
        };
        while let Some(KeySegment::Index(i)) = segments.peek() {
            let DeValue::Array(a) = value else {
                return false;
            };
            let Some(element) = a.get_mut(*i) else {
                return false;
            };
            value = element.get_mut();
            segments.next();
        }
        let DeValue::Table(t) = value else {
            return false;
        };
        table = t;
    }
    table.remove(last.as_str()).is_some()
}

/// The line of `key`'s name in the file, when the file has that key.
fn line_of_key(root: &DeTable<'_>, text: &str, key: &KeyPath) -> Option<usize> {
    let mut table = root;
    let mut line = None;
    let mut value: Option<&Spanned<DeValue<'_>>> = None;
    for segment in &key.0 {
        match segment {
            KeySegment::Key(k) => {
                if let Some(v) = value {
                    let DeValue::Table(t) = v.get_ref() else {
                        return line;
                    };
                    table = t;
                }
                let Some((name, v)) = table.get_key_value(k.as_str()) else {
                    return line;
                };
                line = Some(line_of(text, name.span().start));
                value = Some(v);
            }
            KeySegment::Index(i) => {
                let Some(DeValue::Array(a)) = value.map(|v| v.get_ref()) else {
                    return line;
                };
                let Some(e) = a.get(*i) else {
                    return line;
                };
                line = Some(line_of(text, e.span().start));
                value = Some(e);
            }
        }
    }
    line
}

/// The deepest key named on `line`.
fn key_on_line(root: &DeTable<'_>, text: &str, line: usize) -> KeyPath {
    fn walk(table: &DeTable<'_>, text: &str, line: usize, path: &mut KeyPath, best: &mut KeyPath) {
        for (k, v) in table.iter() {
            path.0.push(KeySegment::Key(k.get_ref().to_string()));
            if line_of(text, k.span().start) == line && path.0.len() > best.0.len() {
                *best = path.clone();
            }
            if let DeValue::Table(t) = v.get_ref() {
                walk(t, text, line, path, best);
            } else if let DeValue::Array(a) = v.get_ref() {
                for (i, e) in a.iter().enumerate() {
                    if let DeValue::Table(t) = e.get_ref() {
                        path.0.push(KeySegment::Index(i));
                        walk(t, text, line, path, best);
                        path.0.pop();
                    }
                }
            }
            path.0.pop();
        }
    }
    let mut best = KeyPath::root();
    walk(root, text, line, &mut KeyPath::root(), &mut best);
    best
}

/// `missing field `x`` names `x`.
fn missing_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next()
}

/// serde's message, with a "did you mean" for an unknown key or variant close to a known one.
fn explain(message: &str) -> String {
    let unknown = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|p| message.strip_prefix(p));
    let Some(rest) = unknown else {
        return message.to_string();
    };
    let Some((name, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    match did_you_mean(name, &known) {
        // The list of every known name is noise next to the one that was meant.
        Some(near) => {
            let head = message.split(", expected").next().unwrap_or(message);
            format!("{head}; did you mean `{near}`?")
        }
        None => message.to_string(),
    }
}

/// The known name closest to `name`, when it is close enough to be a slip of the keyboard.
pub(super) fn did_you_mean<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (edit_distance(name, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edit distance where a swap of two neighbouring letters counts as one edit (optimal string
/// alignment).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The 1-based line of byte `offset`.
pub(super) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_misses_are_suggested_and_far_ones_not() {
        let known = ["tokens", "token_latency_ms", "kind"];
        assert_eq!(did_you_mean("tokenz", &known), Some("tokens"));
        assert_eq!(
            did_you_mean("base_ulr", &["base_url", "keys"]),
            Some("base_url")
        );
        assert_eq!(did_you_mean("listen_adress", &["http_addr"]), None);
    }

    #[test]
    fn every_problem_is_found_once_with_its_line_and_key() {
        let text = "[server]\nhttp_adr = \"x\"\nshutdown_grace_secs = \"2s\"\n\
                    [aliases.a]\nchain = 5\n[aliases.b]\nchain = [\"nope/m\"]\n";
        let problems = check_text(text).unwrap_err();
        let found: Vec<(Option<usize>, String)> = problems
            .iter()
            .map(|p| (p.line, p.key.to_string()))
            .collect();
        assert_eq!(
            found,
            [
                (Some(2), "server.http_adr".to_string()),
                (Some(3), "server.shutdown_grace_secs".to_string()),
                (Some(5), "aliases.a.chain".to_string()),
                (Some(7), "aliases.b.chain[0]".to_string()),
            ],
            "{problems:?}"
        );
        assert!(problems[0].message.contains("did you mean `http_addr`?"));
        // `chain` was taken out for its wrong type: it is not also reported missing.
        assert!(!problems.iter().any(|p| p.message.contains("missing field")));
    }

    #[test]
    fn a_value_from_the_environment_that_does_not_fit_is_not_quoted() {
        std::env::set_var("TG_CHECK_TEST_ADDR", "secret-value-not-an-address");
        let problems = check_text("[server]\nhttp_addr = \"${TG_CHECK_TEST_ADDR}\"\n").unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        let text = problems[0].to_string();
        assert!(text.starts_with("line 2: server.http_addr: "), "{text}");
        assert!(!text.contains("secret-value"), "{text}");
    }

    #[test]
    fn paths_print_dotted_with_quotes_and_indices() {
        let p = KeyPath::root().key("pricing").key("openai/gpt-4o");
        assert_eq!(p.to_string(), "pricing.\"openai/gpt-4o\"");
        let p = KeyPath::root()
            .key("auth")
            .key("static_keys")
            .index(0)
            .key("key");
        assert_eq!(p.to_string(), "auth.static_keys[0].key");
    }
}
