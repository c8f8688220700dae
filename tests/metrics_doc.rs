//! The operator-facing contracts against what the real `playhead` binary serves at
//! `/metrics`, so none of them can drift again:
//! - docs/metrics.md: every family served is in its tables (name, type, label names, and the
//!   label values a row enumerates), and every family in its tables is served — except the
//!   few in [`ONLY_UNDER_CONDITIONS`], which must then at least be named in the source;
//! - docs/protocol.md: the binary reject reasons and protocol-error codes it names are the
//!   label values the metrics carry;
//! - deploy/prometheus/alerts.yml: `promtool check rules` and `promtool test rules` pass, and
//!   every metric it names is served;
//! - deploy/grafana/playhead.json: every panel has a query, and every metric a query names
//!   is served.
//!
//! One server is started for the whole file (a [`OnceLock`]): the real binary with its
//! defaults (embedded store), driven with a little HTTP and binary traffic — accepted and
//! rejected heartbeats of both protocols, reads, an unknown route, a binary connection held
//! open and one closed by a protocol error — so that every label the page can carry shows.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::process::{metric, Process};
use playhead::ingest::binary::client::{Client, Reply};
use playhead::ingest::binary::codec::WireRecord;
use playhead::resume::catalog::title_id_of;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Families documented in docs/metrics.md that the default server does not serve, with the
/// condition under which it does. Each must be documented, must not be served here (or it
/// belongs off this list), and must be named as a string literal somewhere under `src/`.
const ONLY_UNDER_CONDITIONS: &[(&str, &str)] = &[
    // The change stream's (tests/events.rs compares them with a server that has it on).
    ("playhead_events_published_total", "events.kind = nats"),
    ("playhead_events_failed_total", "events.kind = nats"),
    ("playhead_events_pending", "events.kind = nats"),
    ("playhead_events_lag_seconds", "events.kind = nats"),
    ("playhead_events_connected", "events.kind = nats"),
    (
        "playhead_events_publish_duration_seconds",
        "events.kind = nats",
    ),
    // The Cassandra store renders these (tests/store_conformance.rs and the Cassandra
    // tests see them against a real node); this server runs the embedded store.
    (
        "playhead_cassandra_requests_total",
        "store.kind = cassandra",
    ),
    ("playhead_cassandra_errors_total", "store.kind = cassandra"),
    (
        "playhead_cassandra_timeouts_total",
        "store.kind = cassandra",
    ),
    (
        "playhead_cassandra_driver_retries_total",
        "store.kind = cassandra",
    ),
    (
        "playhead_cassandra_rows_written_total",
        "store.kind = cassandra",
    ),
    (
        "playhead_cassandra_in_flight_requests",
        "store.kind = cassandra",
    ),
    (
        "playhead_cassandra_request_duration_seconds",
        "store.kind = cassandra",
    ),
    (
        "playhead_cassandra_cancelled_total",
        "store.kind = cassandra",
    ),
    ("playhead_cassandra_breaker_state", "store.kind = cassandra"),
    (
        "playhead_cassandra_breaker_opened_total",
        "store.kind = cassandra",
    ),
    (
        "playhead_cassandra_breaker_refused_total",
        "store.kind = cassandra",
    ),
    (
        "playhead_cassandra_breaker_probes_abandoned_total",
        "store.kind = cassandra",
    ),
];

// ---------------------------------------------------------------------------------------
// The scrape

/// One metric family as served: its type, and for each label name every value seen.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeMap<String, BTreeSet<String>>,
    samples: usize,
}

/// The /metrics page of the server once traffic went through, and its families.
struct Scrape {
    page: String,
    families: BTreeMap<String, Family>,
}

impl Scrape {
    /// The values `family`'s samples carry for `label` where they also carry `filter`.
    fn values(&self, family: &str, label: &str, filter: Option<(&str, &str)>) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for line in self.page.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, labels)) = parse_sample(line) else {
                continue;
            };
            if name != family {
                continue;
            }
            if let Some((k, v)) = filter {
                if labels
                    .iter()
                    .all(|(lk, lv)| (lk.as_str(), lv.as_str()) != (k, v))
                {
                    continue;
                }
            }
            out.extend(
                labels
                    .into_iter()
                    .filter(|(k, _)| k == label)
                    .map(|(_, v)| v),
            );
        }
        out
    }
}

/// The scrape, taken once for every test of this file.
fn scrape() -> &'static Scrape {
    static SCRAPE: OnceLock<Scrape> = OnceLock::new();
    SCRAPE.get_or_init(|| {
        let page = serve_and_scrape();
        let families = parse_page(&page);
        Scrape { page, families }
    })
}

fn serve_and_scrape() -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = Process::start(dir.path(), &[]);
    http_traffic(&p);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The client stays connected over the scrape: `playhead_binary_connections` is 1.
    let _client = runtime.block_on(binary_traffic(&p));
    protocol_error(&p);
    wait_for(&p, "playhead_flush_cycles_total", 1.0);
    let page = p.metrics();
    assert!(
        metric(&page, "playhead_binary_connections") >= 1.0,
        "{page}"
    );
    page
}

fn token(account: u64) -> String {
    playhead::ingest::auth::mint_hs256(playhead::ingest::auth::DEV_SECRET, account, 1, 600).unwrap()
}

fn http_traffic(p: &Process) {
    let t = token(1);
    let good = r#"{"movie_id":"inception","position_seconds":60,"device_id":"tv"}"#;
    let unknown = r#"{"movie_id":"no-such-movie","position_seconds":60,"device_id":"tv"}"#;
    let progress = "/api/v1/stream/progress";
    assert_eq!(p.http("POST", progress, Some(&t), Some(good)).status, 204);
    assert_eq!(
        p.http("POST", progress, Some(&t), Some(unknown)).status,
        404
    );
    assert_eq!(p.http("POST", progress, None, Some(good)).status, 401);
    let read = "/api/v1/stream?movie_id=inception";
    assert_eq!(p.http("GET", read, Some(&t), None).status, 200);
    let list = "/api/v1/continue-watching";
    assert_eq!(p.http("GET", list, Some(&t), None).status, 200);
    for path in ["/healthz", "/readyz", "/no-such-route"] {
        p.http("GET", path, None, None);
    }
}

/// A batch with one accepted record and one of each reject reason; returns the client,
/// still connected.
async fn binary_traffic(p: &Process) -> Client {
    let secret = playhead::config::BINARY_DEV_SECRET.as_bytes();
    let mut client = Client::connect(p.binary, secret).await.unwrap();
    let record = |title_id, position_seconds, timestamp_ms| WireRecord {
        account_id: 2,
        profile_id: 1,
        title_id,
        position_seconds,
        device_id: 7,
        timestamp_ms,
    };
    let inception = title_id_of("inception");
    let batch = [
        record(inception, 60, 0),
        record(title_id_of("no-such-movie"), 60, 0),
        record(inception, u32::MAX, 0),
        record(inception, 60, 1),
    ];
    match client.write_batch(&batch).await.unwrap() {
        Reply::Ack {
            accepted,
            rejections,
            ..
        } => assert_eq!((accepted, rejections.len()), (1, 3), "{rejections:?}"),
        other => panic!("expected an ACK, got {other:?}"),
    }
    client
}

/// A connection that opens with garbage: ERROR `bad_magic`, closed.
fn protocol_error(p: &Process) {
    let mut s = TcpStream::connect(p.binary).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[b'X'; 64]).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(!answer.is_empty(), "an ERROR frame before the close");
    wait_for(
        p,
        "playhead_binary_protocol_errors_total{code=\"bad_magic\"}",
        1.0,
    );
}

fn wait_for(p: &Process, sample: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&p.metrics(), sample) < at_least {
        assert!(
            Instant::now() < deadline,
            "{sample} < {at_least} after 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Families by `# TYPE` line, and the label names and values of their samples.
fn parse_page(page: &str) -> BTreeMap<String, Family> {
    let mut families = BTreeMap::<String, Family>::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            let previous = families.insert(
                name.to_string(),
                Family {
                    kind: kind.to_string(),
                    ..Family::default()
                },
            );
            assert!(previous.is_none(), "{name} has two # TYPE lines");
        }
    }
    for line in page
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, labels) = parse_sample(line).unwrap_or_else(|| panic!("bad sample {line:?}"));
        let family = family_of(&families, &name)
            .unwrap_or_else(|| panic!("sample {line:?} belongs to no # TYPE'd family"));
        let family = families.get_mut(&family).unwrap();
        family.samples += 1;
        for (k, v) in labels {
            if k == "le" && family.kind == "histogram" {
                continue;
            }
            family.labels.entry(k).or_default().insert(v);
        }
    }
    families
}

/// The family a sample or PromQL series name belongs to: itself, or the histogram whose
/// `_bucket`, `_sum` or `_count` it is.
fn family_of(families: &BTreeMap<String, Family>, name: &str) -> Option<String> {
    if families.contains_key(name) {
        return Some(name.to_string());
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|s| name.strip_suffix(s))
        .find(|base| families.get(*base).is_some_and(|f| f.kind == "histogram"))
        .map(str::to_string)
}

/// `name{k="v",…} value` → (name, labels); `None` if the line is not a sample.
fn parse_sample(line: &str) -> Option<(String, Vec<(String, String)>)> {
    let end = line.find(['{', ' '])?;
    let name = line[..end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[end..];
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let close = loop {
                match chars.next()? {
                    (_, '\\') => value.push(chars.next()?.1),
                    (i, '"') => break i,
                    (_, c) => value.push(c),
                }
            };
            labels.push((key.to_string(), value));
            rest = &after[close + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    rest.strip_prefix(' ')?.parse::<f64>().ok()?;
    Some((name, labels))
}

// ---------------------------------------------------------------------------------------
// docs/metrics.md

/// One row of a docs/metrics.md table: `| `name` | type | labels | meaning |`.
#[derive(Debug)]
struct DocRow {
    line: usize,
    kind: String,
    /// Label name → the values the row enumerates (`label` = `a` \| `b`), if it does.
    labels: BTreeMap<String, Option<BTreeSet<String>>>,
}

/// Every table row of docs/metrics.md whose first cell is a metric name in backticks.
fn doc_rows() -> BTreeMap<String, DocRow> {
    let text = read("docs/metrics.md");
    let mut rows = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if !line.starts_with("| `playhead_") {
            continue;
        }
        let cells = table_cells(line);
        assert_eq!(
            cells.len(),
            4,
            "docs/metrics.md:{line_no}: a metric row has 4 cells (name | type | labels | meaning): {line}"
        );
        let name = unticked(&cells[0])
            .unwrap_or_else(|| panic!("docs/metrics.md:{line_no}: name not in backticks"));
        let row = DocRow {
            line: line_no,
            kind: cells[1].clone(),
            labels: doc_labels(&cells[2]),
        };
        if let Some(first) = rows.insert(name.clone(), row) {
            panic!(
                "docs/metrics.md:{line_no}: {name} already documented at line {}",
                first.line
            );
        }
    }
    assert!(
        rows.len() > 20,
        "docs/metrics.md: only {} rows parsed",
        rows.len()
    );
    rows
}

/// The cells of a Markdown table row, trimmed; `\|` inside a cell is a literal `|`.
fn table_cells(line: &str) -> Vec<String> {
    let protected = line.replace("\\|", "\u{1}");
    let inner = protected
        .trim()
        .trim_start_matches('|')
        .trim_end_matches('|');
    inner
        .split('|')
        .map(|c| c.replace('\u{1}', "|").trim().to_string())
        .collect()
}

/// `` `x` `` → `x`; `None` when the text is not one backticked word.
fn unticked(cell: &str) -> Option<String> {
    let inner = cell.trim().strip_prefix('`')?.strip_suffix('`')?;
    (!inner.is_empty() && !inner.contains('`')).then(|| inner.to_string())
}

/// A labels cell: empty, or comma-separated `` `name` `` or `` `name` = `a` | `b` ``.
fn doc_labels(cell: &str) -> BTreeMap<String, Option<BTreeSet<String>>> {
    let mut out = BTreeMap::new();
    for part in cell.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, values) = match part.split_once('=') {
            Some((name, values)) => {
                let values = values
                    .split('|')
                    .map(|v| unticked(v).unwrap_or_else(|| panic!("label value {v:?} in {cell:?}")))
                    .collect();
                (name, Some(values))
            }
            None => (part, None),
        };
        let name = unticked(name).unwrap_or_else(|| panic!("label name {name:?} in {cell:?}"));
        out.insert(name, values);
    }
    out
}

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_served_family_is_documented_and_every_documented_one_served() {
    let scrape = scrape();
    let docs = doc_rows();
    let conditional: BTreeMap<_, _> = ONLY_UNDER_CONDITIONS.iter().copied().collect();
    let mut problems = Vec::new();

    for (name, family) in &scrape.families {
        let Some(row) = docs.get(name) else {
            problems.push(format!(
                "{name} ({}) is served but not in docs/metrics.md",
                family.kind
            ));
            continue;
        };
        let at = format!("docs/metrics.md:{}: {name}", row.line);
        if row.kind != family.kind {
            problems.push(format!(
                "{at}: documented as {}, served as {}",
                row.kind, family.kind
            ));
        }
        let documented: BTreeSet<_> = row.labels.keys().cloned().collect();
        let served: BTreeSet<_> = family.labels.keys().cloned().collect();
        if family.samples > 0 && documented != served {
            problems.push(format!(
                "{at}: labels documented {documented:?}, served {served:?}"
            ));
        }
        for (label, values) in &family.labels {
            if let Some(Some(listed)) = row.labels.get(label) {
                let missing: Vec<_> = values.difference(listed).collect();
                if !missing.is_empty() {
                    problems.push(format!(
                        "{at}: {label} values {missing:?} served, not listed"
                    ));
                }
            }
        }
    }

    let mut sources = Vec::new();
    rust_files(&Path::new(ROOT).join("src"), &mut sources);
    let source: String = sources
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    for (name, row) in &docs {
        if scrape.families.contains_key(name) {
            if conditional.contains_key(name.as_str()) {
                problems.push(format!(
                    "{name} is served: take it off ONLY_UNDER_CONDITIONS"
                ));
            }
            continue;
        }
        match conditional.get(name.as_str()) {
            None => problems.push(format!(
                "docs/metrics.md:{}: {name} is documented but not served",
                row.line
            )),
            Some(when) => {
                if !source.contains(&format!("\"{name}\"")) {
                    problems.push(format!(
                        "{name} (served when {when}) is named nowhere in src/"
                    ));
                }
            }
        }
    }
    for (name, _) in ONLY_UNDER_CONDITIONS {
        if !docs.contains_key(*name) {
            problems.push(format!(
                "{name} is in ONLY_UNDER_CONDITIONS but not documented"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/metrics.md has drifted:\n{}",
        problems.join("\n")
    );
}

/// The `name` cells of the docs/protocol.md table whose header starts `| key | name |`.
fn protocol_table_names(key: &str) -> BTreeSet<String> {
    let text = read("docs/protocol.md");
    let header = format!("| {key} | name |");
    let mut lines = text
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with(&header));
    assert!(
        lines.next().is_some(),
        "docs/protocol.md: no table headed {header:?}"
    );
    lines
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|l| unticked(&table_cells(l)[1]).unwrap_or_else(|| panic!("name cell of {l:?}")))
        .collect()
}

#[test]
fn protocol_doc_names_the_labels_the_metrics_carry() {
    let scrape = scrape();
    // Every reason a record can be refused for (the traffic sends one of each), and BUSY,
    // which counts as `overloaded` (docs/metrics.md).
    let mut reasons = protocol_table_names("reason");
    let served = scrape.values(
        "playhead_heartbeats_rejected_total",
        "reason",
        Some(("protocol", "binary")),
    );
    assert!(!reasons.contains("overloaded"));
    let busy_seen = served.contains("overloaded");
    if busy_seen {
        reasons.insert("overloaded".into());
    }
    assert_eq!(
        served, reasons,
        "docs/protocol.md's reject reasons against the binary reasons of \
         playhead_heartbeats_rejected_total"
    );
    // Every protocol error code is served from the start, at 0.
    let codes = protocol_table_names("code");
    let served = scrape.values("playhead_binary_protocol_errors_total", "code", None);
    assert_eq!(
        served, codes,
        "docs/protocol.md's error codes against playhead_binary_protocol_errors_total"
    );
}

// ---------------------------------------------------------------------------------------
// deploy/: alerting rules and the dashboard

/// Every `playhead_…` identifier in `text` that is not served and not in
/// [`ONLY_UNDER_CONDITIONS`], and how many identifiers there were.
fn unserved_metrics(text: &str) -> (Vec<String>, usize) {
    let scrape = scrape();
    let conditional: BTreeSet<_> = ONLY_UNDER_CONDITIONS.iter().map(|(n, _)| *n).collect();
    let mut unserved = Vec::new();
    let mut seen = 0;
    let mut rest = text;
    while let Some(at) = rest.find("playhead_") {
        let boundary = !rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        rest = &tail[end..];
        if !boundary {
            continue;
        }
        seen += 1;
        let family = family_of(&scrape.families, name)
            .or_else(|| conditional.contains(name).then(|| name.to_string()))
            .or_else(|| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|s| name.strip_suffix(s))
                    .find(|b| conditional.contains(b))
                    .map(str::to_string)
            });
        if family.is_none() && !unserved.iter().any(|u| u == name) {
            unserved.push(name.to_string());
        }
    }
    (unserved, seen)
}

fn run_promtool(promtool: &Path, args: &[&str]) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(ROOT)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_and_name_only_served_metrics() {
    let rules = read("deploy/prometheus/alerts.yml");
    let (unserved, seen) = unserved_metrics(&rules);
    assert!(seen >= 10, "only {seen} metric names in alerts.yml");
    assert!(
        unserved.is_empty(),
        "alerts.yml names metrics not served: {unserved:?}"
    );
    // Every alert has its section in docs/metrics.md, and its runbook_url points there.
    let doc = read("docs/metrics.md");
    let headings: BTreeSet<_> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(str::trim)
        .collect();
    let alerts: Vec<_> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 10, "only {} alerts parsed", alerts.len());
    for alert in &alerts {
        assert!(
            headings.contains(alert),
            "docs/metrics.md has no `### {alert}`"
        );
        let url = format!("runbook_url: \"docs/metrics.md#{}\"", alert.to_lowercase());
        assert!(rules.contains(&url), "{alert}: no {url}");
    }
    // The synthetic series of the rule tests must be real metrics too.
    let tests = read("deploy/prometheus/alerts_test.yml");
    let (unserved, _) = unserved_metrics(&tests);
    assert!(
        unserved.is_empty(),
        "alerts_test.yml names metrics not served: {unserved:?}"
    );
    if let Some(promtool) = common::system_tool("promtool", "prometheus") {
        run_promtool(
            &promtool,
            &["check", "rules", "deploy/prometheus/alerts.yml"],
        );
        run_promtool(
            &promtool,
            &["test", "rules", "deploy/prometheus/alerts_test.yml"],
        );
    }
}

/// Every PromQL string of the dashboard (panel targets and templating queries) and the
/// titles of panels without one.
fn dashboard_queries(
    value: &serde_json::Value,
    queries: &mut Vec<String>,
    empty: &mut Vec<String>,
) {
    match value {
        serde_json::Value::Object(map) => {
            if map
                .get("type")
                .and_then(|t| t.as_str())
                .is_some_and(|t| t != "row")
                && map.contains_key("gridPos")
            {
                let targets = map.get("targets").and_then(|t| t.as_array());
                if targets.is_none_or(|t| t.is_empty()) {
                    empty.push(map["title"].as_str().unwrap_or("?").to_string());
                }
            }
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", serde_json::Value::String(q)) => queries.push(q.clone()),
                    ("query" | "definition", serde_json::Value::String(q)) => {
                        queries.push(q.clone())
                    }
                    ("query", serde_json::Value::Object(q)) => {
                        if let Some(q) = q.get("query").and_then(|q| q.as_str()) {
                            queries.push(q.to_string());
                        }
                    }
                    _ => dashboard_queries(v, queries, empty),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                dashboard_queries(v, queries, empty);
            }
        }
        _ => {}
    }
}

#[test]
fn dashboard_queries_name_only_served_metrics() {
    let text = read("deploy/grafana/playhead.json");
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    let (mut queries, mut empty) = (Vec::new(), Vec::new());
    dashboard_queries(&dashboard["panels"], &mut queries, &mut empty);
    assert!(empty.is_empty(), "panels without a query: {empty:?}");
    assert!(queries.len() >= 15, "only {} queries", queries.len());
    // Template variables of type `query` are PromQL too (`label_values(…)`); the
    // datasource variable is not.
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] == "query" {
            dashboard_queries(variable, &mut queries, &mut empty);
        }
    }
    let mut problems = Vec::new();
    for q in &queries {
        let (unserved, seen) = unserved_metrics(q);
        if seen == 0 {
            problems.push(format!("names no playhead metric: {q}"));
        }
        if !unserved.is_empty() {
            problems.push(format!("{unserved:?} not served: {q}"));
        }
    }
    assert!(
        problems.is_empty(),
        "deploy/grafana/playhead.json:\n{}",
        problems.join("\n")
    );
}
