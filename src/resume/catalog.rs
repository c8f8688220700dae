//! The catalog: which titles exist, how long they are, where they stream from, and which
//! episode follows which. Loaded from `config/catalog.toml` at start (docs/catalog.md).
//!
//! Inside the engine a title is a `u64`: the 64-bit FNV-1a hash of its string id. That is
//! stable across restarts and catalog edits (the store keys on it) and lets a gateway on the
//! binary protocol compute it without a lookup. Two ids that collide are refused at load.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

/// Longest title id accepted anywhere (catalog and API).
pub const MAX_TITLE_ID_BYTES: usize = 128;

/// A catalog that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The reason is in the message, not the error chain, so `{:#}` names it once.
    #[error("cannot read catalog {path}: {reason}")]
    Read {
        path: String,
        reason: std::io::Error,
    },
    #[error("catalog {path} is not valid: {detail}")]
    Parse { path: String, detail: String },
    #[error("catalog title `{id}`: {problem}")]
    Invalid { id: String, problem: String },
}

/// One playable title.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Title {
    /// The string id the HTTP API speaks (`movie_id`).
    pub id: String,
    /// The compact id the engine and the stores use.
    pub title_id: u64,
    pub duration_seconds: u32,
    pub stream_url: String,
    /// Series membership: (series id, episode order).
    pub series: Option<(String, u32)>,
}

/// The loaded catalog: lookups by string id and by compact id, and "next episode".
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    titles: Vec<Title>,
    // Looked up once per heartbeat: foldhash, not the default SipHash (which showed in the
    // ingest profile). The keys come from the catalog file, never from clients, so the
    // maps need no flooding resistance.
    by_id: HashMap<String, usize, foldhash::fast::RandomState>,
    by_title_id: HashMap<u64, usize, foldhash::fast::RandomState>,
    /// For each episode, the index of the episode after it in its series.
    next_episode: HashMap<usize, usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    title: Vec<TitleEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TitleEntry {
    id: String,
    duration_seconds: u32,
    stream_url: String,
    series: Option<String>,
    episode: Option<u32>,
}

/// The compact id of a string title id: 64-bit FNV-1a.
pub fn title_id_of(id: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    id.bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

impl Catalog {
    /// Reads and validates a TOML catalog file.
    pub fn load(path: &Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|reason| CatalogError::Read {
            path: path.display().to_string(),
            reason,
        })?;
        Self::parse(&text).map_err(|e| match e {
            CatalogError::Parse { detail, .. } => CatalogError::Parse {
                path: path.display().to_string(),
                detail,
            },
            other => other,
        })
    }

    /// Parses and validates catalog TOML.
    pub fn parse(text: &str) -> Result<Self, CatalogError> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| CatalogError::Parse {
            path: "(inline)".into(),
            detail: e.to_string(),
        })?;
        let mut catalog = Catalog::default();
        for entry in file.title {
            let invalid = |problem: &str| CatalogError::Invalid {
                id: entry.id.clone(),
                problem: problem.to_string(),
            };
            if entry.id.is_empty() || entry.id.len() > MAX_TITLE_ID_BYTES {
                return Err(invalid("id must be 1 to 128 bytes"));
            }
            if entry.duration_seconds == 0 {
                return Err(invalid("duration_seconds must be greater than 0"));
            }
            if entry.stream_url.is_empty() {
                return Err(invalid("stream_url must not be empty"));
            }
            let series = match (entry.series.clone(), entry.episode) {
                (Some(s), Some(e)) if !s.is_empty() => Some((s, e)),
                (None, None) => None,
                _ => return Err(invalid("`series` and `episode` go together")),
            };
            let title_id = title_id_of(&entry.id);
            if catalog.by_id.contains_key(&entry.id) {
                return Err(invalid("listed twice"));
            }
            if let Some(&other) = catalog.by_title_id.get(&title_id) {
                return Err(invalid(&format!(
                    "its compact id collides with `{}`; rename one of them",
                    catalog.titles[other].id
                )));
            }
            let index = catalog.titles.len();
            catalog.by_id.insert(entry.id.clone(), index);
            catalog.by_title_id.insert(title_id, index);
            catalog.titles.push(Title {
                id: entry.id,
                title_id,
                duration_seconds: entry.duration_seconds,
                stream_url: entry.stream_url,
                series,
            });
        }
        catalog.link_episodes()?;
        Ok(catalog)
    }

    fn link_episodes(&mut self) -> Result<(), CatalogError> {
        let mut series: HashMap<&str, Vec<(u32, usize)>> = HashMap::new();
        for (index, t) in self.titles.iter().enumerate() {
            if let Some((s, e)) = &t.series {
                series.entry(s.as_str()).or_default().push((*e, index));
            }
        }
        let mut links = HashMap::new();
        for episodes in series.values_mut() {
            episodes.sort_unstable();
            for pair in episodes.windows(2) {
                if pair[0].0 == pair[1].0 {
                    let t = &self.titles[pair[1].1];
                    return Err(CatalogError::Invalid {
                        id: t.id.clone(),
                        problem: format!("episode {} of its series is listed twice", pair[1].0),
                    });
                }
                links.insert(pair[0].1, pair[1].1);
            }
        }
        self.next_episode = links;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&Title> {
        self.by_id.get(id).map(|&i| &self.titles[i])
    }

    pub fn by_title_id(&self, title_id: u64) -> Option<&Title> {
        self.by_title_id.get(&title_id).map(|&i| &self.titles[i])
    }

    /// The episode after `title` in its series, if there is one.
    pub fn next_episode(&self, title: &Title) -> Option<&Title> {
        let index = *self.by_title_id.get(&title.title_id)?;
        self.next_episode.get(&index).map(|&i| &self.titles[i])
    }

    pub fn len(&self) -> usize {
        self.titles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.titles.is_empty()
    }

    pub fn titles(&self) -> &[Title] {
        &self.titles
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named_with_its_reason_once() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/no-such-catalog.toml");
        let error = anyhow::Error::from(Catalog::load(&path).unwrap_err());
        let shown = format!("{error:#}");
        assert!(shown.contains("no-such-catalog.toml"), "{shown}");
        assert_eq!(shown.matches("os error 2").count(), 1, "{shown}");
    }

    #[test]
    fn shipped_sample_loads_with_a_film_and_a_series() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/catalog.toml");
        let c = Catalog::load(&path).unwrap();
        let inception = c.get("inception").unwrap();
        assert_eq!(inception.duration_seconds, 7_800);
        assert!(c.next_episode(inception).is_none());
        let e1 = c.get("dark-s01e01").unwrap();
        assert_eq!(c.next_episode(e1).unwrap().id, "dark-s01e02");
        let last = c.get("dark-s01e04").unwrap();
        assert!(c.next_episode(last).is_none());
        assert_eq!(
            c.by_title_id(title_id_of("inception")).unwrap().id,
            "inception"
        );
    }

    #[test]
    fn episodes_are_ordered_by_number_not_by_listing() {
        let c = Catalog::parse(
            r#"
            [[title]]
            id = "b"
            duration_seconds = 10
            stream_url = "u"
            series = "s"
            episode = 2
            [[title]]
            id = "a"
            duration_seconds = 10
            stream_url = "u"
            series = "s"
            episode = 1
            "#,
        )
        .unwrap();
        assert_eq!(c.next_episode(c.get("a").unwrap()).unwrap().id, "b");
    }

    #[test]
    fn invalid_entries_are_refused_with_the_title_named() {
        for (body, needle) in [
            (
                "id = \"x\"\nduration_seconds = 0\nstream_url = \"u\"",
                "duration_seconds",
            ),
            (
                "id = \"x\"\nduration_seconds = 5\nstream_url = \"\"",
                "stream_url",
            ),
            (
                "id = \"x\"\nduration_seconds = 5\nstream_url = \"u\"\nseries = \"s\"",
                "go together",
            ),
            (
                "id = \"x\"\nduration_seconds = 5\nstream_url = \"u\"\ncolour = 1",
                "colour",
            ),
        ] {
            let err = Catalog::parse(&format!("[[title]]\n{body}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
        let twice = "[[title]]\nid = \"x\"\nduration_seconds = 5\nstream_url = \"u\"\n";
        let err = Catalog::parse(&format!("{twice}{twice}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listed twice"), "{err}");
    }

    #[test]
    fn fnv1a_matches_reference_vectors() {
        assert_eq!(title_id_of(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(title_id_of("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(title_id_of("foobar"), 0x8594_4171_f739_67e8);
    }
}
