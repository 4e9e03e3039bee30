//! What `deploy/` ships is valid and only uses what leaktrace exports:
//! the example Prometheus config and alert rules pass `promtool` (syntax and
//! the rules' unit tests), and every metric the Grafana dashboard queries is
//! a family that docs/report.md lists. `promtool` comes with Debian's
//! `prometheus` package (`cargo xtask setup` installs it). No root needed.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `promtool` binary; fails the test when it is missing.
fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("promtool"))
        .chain([PathBuf::from("/usr/bin/promtool")])
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "promtool is missing: it ships in Debian's `prometheus` package, which \
             `cargo xtask setup` installs (or: apt-get install -y prometheus)"
        )
    })
}

/// Runs `promtool ARGS` in `dir`; panics with its output unless it succeeds.
fn run_promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(promtool()).current_dir(dir).args(args).output().expect("run promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {} failed ({}):\n{text}", args.join(" "), out.status);
    text
}

#[test]
fn example_scrape_config_and_alert_rules_pass_promtool() {
    let dir = root().join("deploy/prometheus");
    let out = run_promtool(&dir, &["check", "config", "prometheus.yml"]);
    // The config loads the alert rules, so they are checked with it.
    assert!(out.contains("1 rule files found"), "prometheus.yml does not load the rules:\n{out}");
    let out = run_promtool(&dir, &["check", "rules", "leaktrace-alerts.yml"]);
    assert!(out.contains("SUCCESS: 5 rules found"), "{out}");
    run_promtool(&dir, &["test", "rules", "leaktrace-alerts.test.yml"]);

    let config = fs::read_to_string(dir.join("prometheus.yml")).unwrap();
    assert!(config.contains("127.0.0.1:9464"), "the example scrapes leaktrace on 127.0.0.1:9464");
    let rules = fs::read_to_string(dir.join("leaktrace-alerts.yml")).unwrap();
    for alert in ["LeaktraceLeak", "LeaktraceSustainedGrowth", "LeaktraceUnclosed", "LeaktraceResourceExhaustion", "LeaktraceLostEvents"] {
        assert!(rules.contains(&format!("alert: {alert}\n")), "{alert} missing");
    }
    let documented = documented_metrics();
    let exprs: Vec<&str> = rules.lines().filter_map(|l| l.trim().strip_prefix("expr:")).collect();
    assert_eq!(exprs.len(), 5, "one single-line expr per rule expected");
    for expr in exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        for m in names {
            assert!(documented.contains(&m), "alert rules use {m}, not in docs/report.md ({documented:?}): {expr}");
        }
    }
}

/// The sample names listed in docs/report.md's "Prometheus metrics" table.
fn documented_metrics() -> BTreeSet<String> {
    let doc = fs::read_to_string(root().join("docs/report.md")).unwrap();
    let section = doc.split("## Prometheus metrics").nth(1).expect("docs/report.md: no Prometheus metrics section");
    let section = section.split("\n## ").next().unwrap();
    let names: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("leaktrace_"))
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 9, "docs/report.md lists too few families: {names:?}");
    names
}

/// PromQL words that are not metric names when not followed by `(`.
const KEYWORDS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless", "inf", "nan", "atan2"];

/// Metric names an expression (or a text of expressions) refers to: the
/// identifiers that are neither functions, keywords, grouping labels, label
/// matchers, strings, ranges nor Grafana variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Tokens: identifiers, and single punctuation characters; strings,
    // label matchers `{...}` and ranges `[...]` are dropped.
    let mut tokens: Vec<String> = Vec::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c == '{' || c == '[' {
            let close = if c == '{' { '}' } else { ']' };
            while i < chars.len() && chars[i] != close {
                if chars[i] == '"' {
                    i += 1;
                    while i < chars.len() && chars[i] != '"' {
                        if chars[i] == '\\' {
                            i += 1;
                        }
                        i += 1;
                    }
                }
                i += 1;
            }
            i += 1;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // Grafana variables, numbers and durations.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            tokens.push(chars[start..i].iter().collect());
        } else if c == '#' {
            // A comment: to the end of the line.
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else {
            if !c.is_whitespace() {
                tokens.push(c.to_string());
            }
            i += 1;
        }
    }
    let mut names = BTreeSet::new();
    let mut t = 0;
    while t < tokens.len() {
        let tok = &tokens[t];
        // A function call, or an aggregation with its grouping first (`sum by (x) (...)`).
        let next_is_paren = tokens.get(t + 1).is_some_and(|n| n == "(" || n == "by" || n == "without");
        let is_ident = tok.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
        if is_ident
            && ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&tok.as_str())
            && tokens.get(t + 1).is_some_and(|n| n == "(")
        {
            // Label names in a grouping clause.
            while t < tokens.len() && tokens[t] != ")" {
                t += 1;
            }
        } else if is_ident && !next_is_paren && !KEYWORDS.contains(&tok.as_str()) {
            names.insert(tok.clone());
        }
        t += 1;
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        r#"sum by (pid, kind) (rate(leaktrace_events_total{pid=~"$pid", kind!="a{b}"}[$__rate_interval])) / on (pid) group_left (x) max without (verdict) (leaktrace_findings offset 5m) > bool 2 or vector(0)"#,
    );
    assert_eq!(names, BTreeSet::from(["leaktrace_events_total".to_string(), "leaktrace_findings".to_string()]));
    assert_eq!(metric_names("up == 0"), BTreeSet::from(["up".to_string()]));
}

/// Every panel of the dashboard, rows' nested panels included.
fn all_panels(dash: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    let mut stack: Vec<Value> = dash["panels"].as_array().cloned().unwrap_or_default();
    while let Some(p) = stack.pop() {
        stack.extend(p["panels"].as_array().cloned().unwrap_or_default());
        out.push(p);
    }
    out
}

fn dashboard() -> Value {
    let path = root().join("deploy/grafana/leaktrace-dashboard.json");
    let text = fs::read_to_string(&path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// `(where, PromQL)` of every query in the dashboard: panel targets and
/// the template variables' `label_values(SELECTOR, label)` selectors.
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in all_panels(dash) {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().unwrap_or("?").to_string();
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr: {t}"));
            out.push((format!("panel {title:?}"), expr.to_string()));
        }
    }
    for v in dash["templating"]["list"].as_array().cloned().unwrap_or_default() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or("").to_string();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.rsplit_once(','))
            .map(|(sel, _)| sel.trim().to_string())
            .unwrap_or_else(|| panic!("variable {}: expected label_values(SELECTOR, label): {q}", v["name"]));
        out.push((format!("variable {}", v["name"]), inner));
    }
    out
}

#[test]
fn dashboard_queries_only_documented_metrics() {
    let dash = dashboard();
    let documented = documented_metrics();
    assert!(dash["schemaVersion"].as_u64().unwrap_or(0) >= 36, "schemaVersion too old");
    let vars = dash["templating"]["list"].as_array().expect("templating variables");
    assert!(
        vars.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus" && v["name"] == "datasource"),
        "no Prometheus datasource variable named datasource"
    );
    let mut used = BTreeSet::new();
    for (place, expr) in dashboard_queries(&dash) {
        let names = metric_names(&expr);
        assert!(!names.is_empty(), "{place}: no metric in {expr}");
        for m in names {
            assert!(documented.contains(&m), "{place}: {m} is not a metric docs/report.md lists ({documented:?}): {expr}");
            used.insert(m);
        }
    }
    for needed in [
        "leaktrace_live_objects",
        "leaktrace_growth_per_minute",
        "leaktrace_findings",
        "leaktrace_events_total",
        "leaktrace_events_lost_total",
    ] {
        assert!(used.contains(needed), "the dashboard does not show {needed}");
    }
    for p in all_panels(&dash) {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {} does not use the datasource variable", p["title"]);
    }
}

/// Every dashboard query parses as PromQL: they go into a rule file (Grafana
/// variables replaced by values) that `promtool check rules` must accept.
#[test]
fn dashboard_queries_are_valid_promql() {
    let dash = dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in dashboard_queries(&dash).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("$instance", ".*")
            .replace("$pid", ".*")
            .replace("$comm", ".*")
            .replace("$container", ".*");
        assert!(!expr.contains('$'), "unknown Grafana variable in {expr}");
        rules.push_str(&format!("      - record: dashboard:query{i}\n        expr: {}\n", serde_json::to_string(&expr).unwrap()));
    }
    let dir = std::env::temp_dir().join(format!("leaktrace-dashboard-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("dashboard-rules.yml"), &rules).unwrap();
    let out = Command::new(promtool()).current_dir(&dir).args(["check", "rules", "dashboard-rules.yml"]).output();
    let _ = fs::remove_dir_all(&dir);
    let out = out.expect("run promtool");
    assert!(
        out.status.success(),
        "dashboard queries that are not valid PromQL:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ------------------------------------------------------------ fleet

/// The capabilities docs/fleet.md's least-privilege table lists
/// (`CAP_SYS_ADMIN`, ...), as tests/privileges.rs found them.
fn documented_capabilities() -> BTreeSet<String> {
    let doc = fs::read_to_string(root().join("docs/fleet.md")).unwrap();
    let section = doc.split("## Least privilege").nth(1).expect("docs/fleet.md: no Least privilege section");
    let caps: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `CAP_"))
        .filter_map(|l| l.split('`').next())
        .map(|c| format!("CAP_{c}"))
        .collect();
    assert!(caps.len() >= 3, "{caps:?}");
    caps
}

/// `key=value` lines of one `[section]` of a systemd unit.
fn unit_section(text: &str, name: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{name}]");
        } else if inside && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

/// The port of a `--listen HOST:PORT` / `--listen=HOST:PORT` in `args`.
fn listen_port(args: &[String]) -> u16 {
    let value = args
        .iter()
        .position(|a| a == "--listen")
        .map(|i| args[i + 1].clone())
        .or_else(|| args.iter().find_map(|a| a.strip_prefix("--listen=").map(str::to_string)))
        .expect("no --listen");
    value.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).expect("--listen HOST:PORT")
}

#[test]
fn systemd_unit_runs_the_agent_unprivileged_with_the_documented_capabilities() {
    let text = fs::read_to_string(root().join("deploy/systemd/leaktrace-agent.service")).unwrap();
    let service = unit_section(&text, "Service");
    let get = |k: &str| service.iter().filter(|(key, _)| key == k).map(|(_, v)| v.clone()).collect::<Vec<_>>();
    let caps = |k: &str| get(k).iter().flat_map(|v| v.split_whitespace().map(str::to_string).collect::<Vec<_>>()).collect::<BTreeSet<_>>();
    let documented = documented_capabilities();
    assert_eq!(caps("AmbientCapabilities"), documented, "AmbientCapabilities");
    assert_eq!(caps("CapabilityBoundingSet"), documented, "CapabilityBoundingSet");
    let user = get("User");
    assert!(user.len() == 1 && user[0] != "root" && user[0] != "0", "User= {user:?}");
    assert_eq!(get("NoNewPrivileges"), ["yes"]);
    assert!(!get("MemoryMax").is_empty() && !get("CPUQuota").is_empty(), "resource bounds missing");
    let exec = get("ExecStart");
    assert_eq!(exec.len(), 1);
    let args: Vec<String> = exec[0].split_whitespace().map(str::to_string).collect();
    assert!(args[0].ends_with("/leaktrace") && args[1] == "agent" && args.iter().any(|a| a == "--match"), "{args:?}");
    assert_ne!(listen_port(&args), 9464, "9464 is the OpenTelemetry SDK exporter's port");
    assert!(unit_section(&text, "Install").iter().any(|(k, v)| k == "WantedBy" && v == "multi-user.target"));
}

fn yaml_docs(path: &str) -> Vec<serde_norway::Value> {
    use serde::Deserialize;
    let text = fs::read_to_string(root().join(path)).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde_norway::Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: not YAML: {e}")))
        .collect()
}

fn strs(v: &serde_norway::Value) -> Vec<String> {
    v.as_sequence().map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

#[test]
fn daemonset_and_podmonitor_have_what_the_agent_needs() {
    let docs = yaml_docs("deploy/kubernetes/leaktrace-agent.yaml");
    let ds = docs.iter().find(|d| d["kind"].as_str() == Some("DaemonSet")).expect("no DaemonSet");
    assert_eq!(ds["apiVersion"].as_str(), Some("apps/v1"));
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"].as_bool(), Some(true), "the agent needs the host's pids");
    assert!(pod["tolerations"].as_sequence().is_some_and(|t| !t.is_empty()), "no tolerations: not on tainted nodes");
    let template_labels = &ds["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&ds["spec"]["selector"]["matchLabels"], template_labels);
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"].as_bool(), Some(true), "privileged instead of capabilities");
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<String> = strs(&sc["capabilities"]["add"]).into_iter().map(|c| format!("CAP_{c}")).collect();
    assert_eq!(added, documented_capabilities(), "the DaemonSet's capabilities");
    for limit in ["cpu", "memory"] {
        assert!(c["resources"]["limits"][limit].as_str().is_some(), "no {limit} limit");
    }
    let mounts = c["volumeMounts"].as_sequence().expect("volumeMounts");
    for m in mounts {
        assert_eq!(m["readOnly"].as_bool(), Some(true), "a writable host mount: {m:?}");
    }
    let mounted: Vec<&str> = mounts.iter().filter_map(|m| m["mountPath"].as_str()).collect();
    for needed in ["/sys/kernel/tracing", "/sys/fs/cgroup"] {
        assert!(mounted.contains(&needed), "{needed} not mounted: {mounted:?}");
    }
    let args = strs(&c["args"]);
    assert_eq!(args[0], "agent");
    assert!(args.iter().any(|a| a.starts_with("--match")), "{args:?}");
    let port = listen_port(&args);
    assert_ne!(port, 9464);
    // The agent's own budget sheds targets before the container's limit kills it.
    let max_rss: u64 = args.iter().find_map(|a| a.strip_prefix("--max-rss=")).map_or(128, |v| v.parse().expect("--max-rss=MIB"));
    let limit = c["resources"]["limits"]["memory"].as_str().and_then(|m| m.strip_suffix("Mi")?.parse::<u64>().ok()).expect("memory limit in Mi");
    assert!(max_rss < limit, "--max-rss {max_rss} MiB is not under the memory limit {limit}Mi");
    let ports = c["ports"].as_sequence().expect("ports");
    assert!(
        ports.iter().any(|p| p["name"].as_str() == Some("metrics") && p["containerPort"].as_u64() == Some(u64::from(port))),
        "no containerPort named metrics on {port}: {ports:?}"
    );

    let monitors = yaml_docs("deploy/kubernetes/podmonitor.yaml");
    let pm = monitors.iter().find(|d| d["kind"].as_str() == Some("PodMonitor")).expect("no PodMonitor");
    assert_eq!(pm["apiVersion"].as_str(), Some("monitoring.coreos.com/v1"));
    assert_eq!(&pm["spec"]["selector"]["matchLabels"], template_labels, "the PodMonitor selects other pods");
    assert_eq!(pm["metadata"]["namespace"], ds["metadata"]["namespace"]);
    let ep = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(ep["port"].as_str(), Some("metrics"));
    assert_eq!(ep["path"].as_str(), Some("/metrics"));
}
