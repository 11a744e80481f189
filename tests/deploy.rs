//! The deployment files of `deploy/`: the Helm chart and the compose file.
//!
//! helm cannot be installed on the project's machines (no package registry they reach carries
//! it), so the chart is rendered here by a small renderer that knows exactly the template
//! constructs the chart uses and refuses any other; every rendered document is read by a YAML
//! parser and its wiring checked (probe paths and ports, the seccomp profile, the selectors of the
//! PodDisruptionBudget, Service and ServiceMonitor against the pod labels, the Secret's keys), and
//! the server is started with the Deployment's own arguments and environment. The compose file is
//! read the same way, its nginx configuration is checked by `nginx -t`, and its services are run as
//! processes on loopback (redis-server, the two nodes, nginx) with their own commands and settings.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde::Deserialize;
use serde_yaml::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    repo().join("deploy/helm/broadcaster")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"))
}

// ---------------------------------------------------------------------------------------------
// A renderer for the chart's templates
// ---------------------------------------------------------------------------------------------

/// What a template sees: `.Values`, `.Release`, `.Chart`.
struct Scope {
    values: Value,
    release: Value,
    chart: Value,
}

enum Node {
    Text(String),
    /// A pipeline whose value is written out.
    Out(String),
    If(String, Vec<Node>, Vec<Node>),
}

/// Splits a template into text and actions, applying the `{{-` and `-}}` whitespace trims.
fn lex(tpl: &str) -> Result<Vec<(bool, String)>, String> {
    let mut out: Vec<(bool, String)> = Vec::new();
    let mut rest = tpl;
    let mut trim_next = false;
    while let Some(open) = rest.find("{{") {
        let mut text = &rest[..open];
        if trim_next {
            text = text.trim_start();
        }
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| format!("unclosed action at {:?}", &rest[open..]))?;
        let mut action = &after[..close];
        if let Some(a) = action.strip_prefix("- ") {
            text = text.trim_end();
            action = a;
        }
        trim_next = false;
        if let Some(a) = action.strip_suffix(" -") {
            trim_next = true;
            action = a;
        }
        out.push((false, text.to_string()));
        out.push((true, action.trim().to_string()));
        rest = &after[close + 2..];
    }
    let text = if trim_next { rest.trim_start() } else { rest };
    out.push((false, text.to_string()));
    Ok(out)
}

/// Builds the tree up to the next `else` or `end` (returned) or the end of the template.
fn parse(
    tokens: &[(bool, String)],
    i: &mut usize,
) -> Result<(Vec<Node>, Option<&'static str>), String> {
    let mut nodes = Vec::new();
    while *i < tokens.len() {
        let (is_action, s) = &tokens[*i];
        *i += 1;
        if !is_action {
            nodes.push(Node::Text(s.clone()));
        } else if s == "end" {
            return Ok((nodes, Some("end")));
        } else if s == "else" {
            return Ok((nodes, Some("else")));
        } else if let Some(cond) = s.strip_prefix("if ") {
            let (then, stop) = parse(tokens, i)?;
            let otherwise = match stop {
                Some("else") => match parse(tokens, i)? {
                    (o, Some("end")) => o,
                    _ => return Err(format!("`if {cond}`: no end after else")),
                },
                Some("end") => Vec::new(),
                _ => return Err(format!("`if {cond}` has no end")),
            };
            nodes.push(Node::If(cond.to_string(), then, otherwise));
        } else if s.starts_with("/*") {
            // A comment.
        } else {
            nodes.push(Node::Out(s.clone()));
        }
    }
    Ok((nodes, None))
}

/// Splits on `sep` outside double quotes.
fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let (mut parts, mut cur, mut quoted) = (Vec::new(), String::new(), false);
    for c in s.chars() {
        if c == '"' {
            quoted = !quoted;
        }
        if c == sep && !quoted {
            parts.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Sequence(s) => !s.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        Value::Tagged(_) => true,
    }
}

fn scalar_text(v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(format!("cannot write {other:?} as text")),
    }
}

impl Scope {
    /// `.Values.a.b`, `.Release.Name`, `.Chart.AppVersion` (Chart.yaml's `appVersion`) or a
    /// string literal. A key that is not there is an error, not an empty value: a typo fails.
    fn operand(&self, token: &str) -> Result<Value, String> {
        if let Some(lit) = token.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
            return Ok(Value::String(lit.to_string()));
        }
        if let Ok(n) = token.parse::<u64>() {
            return Ok(Value::Number(n.into()));
        }
        let mut parts = token
            .strip_prefix('.')
            .ok_or_else(|| format!("unsupported operand {token:?}"))?
            .split('.');
        let root = match parts.next() {
            Some("Values") => &self.values,
            Some("Release") => &self.release,
            Some("Chart") => &self.chart,
            _ => return Err(format!("unsupported operand {token:?}")),
        };
        let chart = std::ptr::eq(root, &self.chart);
        let mut v = root;
        for p in parts {
            let key = if chart {
                let mut c = p.chars();
                c.next()
                    .map(|f| f.to_lowercase().chain(c).collect())
                    .unwrap_or_default()
            } else {
                p.to_string()
            };
            v = v
                .get(&key)
                .ok_or_else(|| format!("{token}: no key {key:?}"))?;
        }
        Ok(v.clone())
    }

    /// One command of a pipeline, with the previous command's value as its last argument.
    fn command(&self, cmd: &str, piped: Option<Value>) -> Result<Value, String> {
        let words = split_outside_quotes(cmd, ' ');
        let (name, args) = words.split_first().ok_or("empty command")?;
        let mut args = args
            .iter()
            .map(|a| self.operand(a))
            .collect::<Result<Vec<_>, _>>()?;
        args.extend(piped);
        match (name.as_str(), args.as_slice()) {
            (".Files.Get", [Value::String(path)]) => {
                let p = chart_dir().join(path);
                std::fs::read_to_string(&p)
                    .map(Value::String)
                    .map_err(|e| format!(".Files.Get {}: {e}", p.display()))
            }
            // Each line indented, after a newline (helm's nindent).
            ("nindent", [Value::Number(n), v]) => {
                let pad = " ".repeat(n.as_u64().ok_or("nindent: not a count")? as usize);
                let text = scalar_text(v)?;
                Ok(Value::String(format!(
                    "\n{pad}{}",
                    text.replace('\n', &format!("\n{pad}"))
                )))
            }
            ("quote", [v]) => Ok(Value::String(
                serde_json::to_string(&scalar_text(v)?).map_err(|e| e.to_string())?,
            )),
            ("not", [v]) => Ok(Value::Bool(!truthy(v))),
            ("required", [Value::String(msg), v]) => {
                if truthy(v) {
                    Ok(v.clone())
                } else {
                    Err(format!("required: {msg}"))
                }
            }
            (operand, []) if operand.starts_with('.') || operand.starts_with('"') => {
                self.operand(operand)
            }
            _ => Err(format!("unsupported template command {cmd:?}")),
        }
    }

    fn pipeline(&self, text: &str) -> Result<Value, String> {
        let mut value = None;
        for cmd in split_outside_quotes(text, '|') {
            value = Some(self.command(&cmd, value)?);
        }
        value.ok_or_else(|| format!("empty action {text:?}"))
    }

    fn write(&self, nodes: &[Node], out: &mut String) -> Result<(), String> {
        for n in nodes {
            match n {
                Node::Text(t) => out.push_str(t),
                Node::Out(p) => out.push_str(&scalar_text(&self.pipeline(p)?)?),
                Node::If(cond, then, otherwise) => {
                    let branch = if truthy(&self.pipeline(cond)?) {
                        then
                    } else {
                        otherwise
                    };
                    self.write(branch, out)?;
                }
            }
        }
        Ok(())
    }

    fn render(&self, tpl: &str) -> Result<String, String> {
        let tokens = lex(tpl)?;
        let mut i = 0;
        let (nodes, stop) = parse(&tokens, &mut i)?;
        if let Some(s) = stop {
            return Err(format!("`{s}` without if"));
        }
        let mut out = String::new();
        self.write(&nodes, &mut out)?;
        Ok(out)
    }
}

/// `b` merged into `a`, as `helm --set`/`-f` does: mappings key by key, anything else replaced.
fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Mapping(a), Value::Mapping(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(old) => merge(old, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (a, b) => *a = b,
    }
}

fn scope(overrides: &str) -> Scope {
    let mut values = yaml(&read(&chart_dir().join("values.yaml")));
    merge(&mut values, yaml(overrides));
    Scope {
        values,
        release: yaml("{Name: bc, Namespace: realtime, Service: Helm}"),
        chart: yaml(&read(&chart_dir().join("Chart.yaml"))),
    }
}

/// Renders every template (`helm template` with `overrides` as a values file): each non-empty
/// document, keyed by `Kind/name`, and the NOTES.
fn render_chart(overrides: &str) -> Result<(BTreeMap<String, Value>, String), String> {
    let scope = scope(overrides);
    let mut docs = BTreeMap::new();
    let mut notes = String::new();
    let mut files: Vec<_> = std::fs::read_dir(chart_dir().join("templates"))
        .map_err(|e| e.to_string())?
        .map(|e| e.map(|e| e.path()).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    files.sort();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let text = scope
            .render(&read(&f))
            .map_err(|e| format!("{name}: {e}"))?;
        if name == "NOTES.txt" {
            notes = text;
            continue;
        }
        assert!(name.ends_with(".yaml"), "unexpected template {name}");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).map_err(|e| format!("{name}: {e}\n{text}"))?;
            if v.is_null() {
                continue;
            }
            let key = format!("{}/{}", s(&v["kind"]), s(&v["metadata"]["name"]));
            assert!(
                docs.insert(key.clone(), v).is_none(),
                "{key} rendered twice"
            );
        }
    }
    Ok((docs, notes))
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn kinds(docs: &BTreeMap<String, Value>) -> Vec<String> {
    docs.values().map(|d| s(&d["kind"]).to_string()).collect()
}

fn only<'a>(docs: &'a BTreeMap<String, Value>, kind: &str) -> &'a Value {
    let of_kind: Vec<_> = docs.values().filter(|d| d["kind"] == kind).collect();
    assert_eq!(of_kind.len(), 1, "one {kind} expected: {:?}", kinds(docs));
    of_kind[0]
}

/// Every label of `selector` is on `labels` with the same value.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_mapping().expect("a selector mapping");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The pod's one container.
fn container(deployment: &Value) -> &Value {
    let cs = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .expect("containers");
    assert_eq!(cs.len(), 1);
    &cs[0]
}

/// The port number behind a container port name.
fn container_port(c: &Value, name: &str) -> u64 {
    c["ports"]
        .as_sequence()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
        .as_u64()
        .expect("containerPort")
}

/// The value of `flag` in the container's arguments.
fn arg_after<'a>(c: &'a Value, flag: &str) -> &'a str {
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(s)
        .collect();
    let i = args
        .iter()
        .position(|a| *a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[i + 1]
}

fn env_of(c: &Value) -> BTreeMap<String, Value> {
    c["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| (s(&e["name"]).to_string(), e.clone()))
        .collect()
}

const SECRETS: &str = "auth: {jwtSecret: chart-test-secret-0123456789, apiKeys: 'k1,k2'}";

#[test]
fn chart_renders_the_workload_its_service_budget_and_monitor_wired_together() {
    let overrides = format!(
        "{SECRETS}\nserviceMonitor: {{enabled: true}}\nredis: {{url: 'redis://redis:6379'}}"
    );
    let (docs, notes) = render_chart(&overrides).unwrap();
    let mut k = kinds(&docs);
    k.sort();
    assert_eq!(
        k,
        [
            "Deployment",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "ServiceMonitor"
        ]
    );

    let dep = only(&docs, "Deployment");
    let pod_labels = &dep["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&dep["spec"]["selector"]["matchLabels"], pod_labels));
    let c = container(dep);
    let listen_port = arg_after(c, "--listen").rsplit(':').next().unwrap();
    let admin_port = arg_after(c, "--admin-listen").rsplit(':').next().unwrap();
    assert_eq!(container_port(c, "http").to_string(), listen_port);
    assert_eq!(container_port(c, "admin").to_string(), admin_port);

    // Readiness and liveness on /health, on the public listener (the one that serves clients).
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], "/health", "{probe}");
        assert_eq!(get["port"], "http", "{probe}");
    }

    // The seccomp profile: Localhost, under the name the server's error message tells to use.
    let sc = &dep["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(sc["seccompProfile"]["type"], "Localhost");
    assert_eq!(
        sc["seccompProfile"]["localhostProfile"],
        "broadcaster-seccomp.json"
    );
    assert_eq!(sc["runAsNonRoot"], true);

    // Guaranteed QoS (the static CPU manager's condition for CPUs of its own), one shard per CPU,
    // and pods kept apart by the labels they carry.
    assert_eq!(c["resources"]["requests"], c["resources"]["limits"]);
    assert_eq!(
        c["resources"]["limits"]["cpu"],
        env_of(c)["BROADCASTER_SHARDS"]["value"]
    );
    let apart = &dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
        ["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(apart["topologyKey"], "kubernetes.io/hostname");
    assert!(selects(&apart["labelSelector"]["matchLabels"], pod_labels));
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);

    // Secrets come from the chart's Secret, under keys it has.
    let secret = only(&docs, "Secret");
    let env = env_of(c);
    for (var, value) in [
        (
            "BROADCASTER_AUTH_JWT_SECRET",
            "chart-test-secret-0123456789",
        ),
        ("BROADCASTER_AUTH_API_KEYS", "k1,k2"),
    ] {
        let r = &env[var]["valueFrom"]["secretKeyRef"];
        assert_eq!(r["name"], secret["metadata"]["name"], "{var}");
        assert_eq!(secret["stringData"][s(&r["key"])], value, "{var}");
    }
    assert_eq!(env["BROADCASTER_REDIS_URL"]["value"], "redis://redis:6379");
    assert_eq!(env["BROADCASTER_SHARDS"]["value"], "2");

    let svc = only(&docs, "Service");
    assert!(selects(&svc["spec"]["selector"], pod_labels));
    let svc_ports = svc["spec"]["ports"].as_sequence().unwrap();
    for p in svc_ports {
        container_port(c, s(&p["targetPort"]));
    }

    // Every pod of the Deployment is counted by the budget.
    let pdb = only(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert!(selects(&pdb["spec"]["selector"]["matchLabels"], pod_labels));
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);

    // The monitor scrapes /metrics on the Service port that reaches the admin listener (the
    // public one answers 404 there when an admin listener is set).
    let sm = only(&docs, "ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert!(selects(
        &sm["spec"]["selector"]["matchLabels"],
        &svc["metadata"]["labels"]
    ));
    let ep = &sm["spec"]["endpoints"][0];
    assert_eq!(ep["path"], "/metrics");
    let port = svc_ports
        .iter()
        .find(|p| p["name"] == ep["port"])
        .unwrap_or_else(|| {
            panic!(
                "the ServiceMonitor's port {:?} is no Service port",
                ep["port"]
            )
        });
    assert_eq!(
        container_port(c, s(&port["targetPort"])).to_string(),
        admin_port
    );

    assert!(notes.contains("bc-broadcaster"), "{notes}");
    assert!(!notes.contains("{{"), "{notes}");
}

#[test]
fn chart_defaults_need_a_secret_and_leave_the_monitor_off() {
    let e = render_chart("{}").expect_err("no secret given");
    assert!(e.contains("auth.jwtSecret is required"), "{e}");

    let (docs, _) = render_chart(SECRETS).unwrap();
    assert!(!kinds(&docs).contains(&"ServiceMonitor".to_string()));
    let env = env_of(container(only(&docs, "Deployment")));
    assert!(!env.contains_key("BROADCASTER_REDIS_URL"));
    assert!(!env.contains_key("BROADCASTER_LIMITS_TRUSTED_PROXIES"));

    // An existing Secret replaces the chart's.
    let (docs, _) =
        render_chart("auth: {existingSecret: mine}\ntrustedProxies: 10.0.0.0/8").unwrap();
    assert!(!kinds(&docs).contains(&"Secret".to_string()));
    let env = env_of(container(only(&docs, "Deployment")));
    assert_eq!(
        env["BROADCASTER_AUTH_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"],
        "mine"
    );
    assert_eq!(
        env["BROADCASTER_LIMITS_TRUSTED_PROXIES"]["value"],
        "10.0.0.0/8"
    );
}

#[test]
fn renderer_refuses_what_it_does_not_know() {
    let sc = scope(SECRETS);
    assert_eq!(
        sc.render("a: {{ .Values.service.port }}\n{{- if .Values.serviceMonitor.enabled }}\nb{{- else }}\nc{{- end }}")
            .unwrap(),
        "a: 8080\nc"
    );
    for bad in [
        "{{ toYaml .Values.service }}",
        "{{ .Values.service }}",
        "{{ .Values.nope }}",
        "{{ include \"x\" . }}",
        "{{ .Files.Get \"no-such-file\" }}",
        "{{ .Values.service.port | nindent }}",
        "{{ if .Values.replicaCount }}x",
        "{{ end }}",
        "{{ .Values.replicaCount",
    ] {
        assert!(sc.render(bad).is_err(), "{bad} rendered");
    }
}

/// The chart's copy of the profile is the shipped one, and the name it is installed under is the
/// one the server's io_uring error tells operators to use.
#[test]
fn chart_seccomp_profile_is_the_shipped_one() {
    let shipped = read(&repo().join("tuning/seccomp.json"));
    let copy = read(&chart_dir().join("files/broadcaster-seccomp.json"));
    assert_eq!(
        copy, shipped,
        "copy tuning/seccomp.json into the chart's files/"
    );
    let preflight = read(&repo().join("src/preflight.rs"));
    let name = s(&scope(SECRETS).values["seccomp"]["localhostProfile"]).to_string();
    assert!(
        preflight.contains(&format!("localhostProfile: {name}")),
        "src/preflight.rs's message names another profile than {name}"
    );
}

/// The optional installer writes the shipped profile where the kubelet reads the name the pods
/// ask for, and its pods are no Broadcaster pods to the Service or the budget.
#[test]
fn chart_seccomp_installer_puts_the_profile_where_the_pods_look() {
    let (docs, _) = render_chart(SECRETS).unwrap();
    assert!(!kinds(&docs).contains(&"DaemonSet".to_string()));
    let (docs, _) = render_chart(&format!(
        "{SECRETS}\nseccomp: {{installer: {{enabled: true, kubeletDir: /var/lib/k}}}}"
    ))
    .unwrap();
    let cm = only(&docs, "ConfigMap");
    let ds = only(&docs, "DaemonSet");
    let profile: serde_json::Value =
        serde_json::from_str(s(&cm["data"]["profile.json"])).expect("the profile as JSON");
    let shipped: serde_json::Value =
        serde_json::from_str(&read(&repo().join("tuning/seccomp.json"))).unwrap();
    assert_eq!(profile, shipped);

    let pod = &ds["spec"]["template"];
    assert!(selects(
        &ds["spec"]["selector"]["matchLabels"],
        &pod["metadata"]["labels"]
    ));
    for other in ["Service", "PodDisruptionBudget"] {
        let doc = only(&docs, other);
        let sel = doc["spec"]["selector"]
            .get("matchLabels")
            .unwrap_or(&doc["spec"]["selector"]);
        assert!(
            !selects(sel, &pod["metadata"]["labels"]),
            "the {other} selects the installer's pods"
        );
    }
    let volumes = pod["spec"]["volumes"].as_sequence().unwrap();
    let volume = |n: &str| volumes.iter().find(|v| v["name"] == n).unwrap();
    assert_eq!(
        volume("profile")["configMap"]["name"],
        cm["metadata"]["name"]
    );
    assert_eq!(
        volume("host-seccomp")["hostPath"]["path"],
        "/var/lib/k/seccomp"
    );
    let init = &pod["spec"]["initContainers"][0];
    let mount = init["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "host-seccomp")
        .unwrap();
    let script = s(&init["command"][2]);
    let wanted = only(&docs, "Deployment")["spec"]["template"]["spec"]["securityContext"]
        ["seccompProfile"]["localhostProfile"]
        .clone();
    assert!(
        script.contains(&format!("{}/{}", s(&mount["mountPath"]), s(&wanted))),
        "{script}"
    );
}

/// The server accepts the Deployment's arguments and environment (with the Secret's values, and
/// loopback ports for the pod's).
#[tokio::test]
async fn chart_configuration_starts_the_server() {
    let (docs, _) = render_chart(&format!("{SECRETS}\ntrustedProxies: 10.0.0.0/8")).unwrap();
    let secret = only(&docs, "Secret");
    let c = container(only(&docs, "Deployment"));
    let args: Vec<String> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| s(a).replace("0.0.0.0:8080", "127.0.0.1:0"))
        .map(|a| a.replace("0.0.0.0:9090", "127.0.0.1:0"))
        .collect();
    assert!(!args.iter().any(|a| a.contains("0.0.0.0")), "{args:?}");
    let env: Vec<(String, String)> = env_of(c)
        .into_iter()
        .map(|(k, e)| {
            let v = match e.get("value") {
                Some(v) => s(v).to_string(),
                None => s(&secret["stringData"][s(&e["valueFrom"]["secretKeyRef"]["key"])]).into(),
            };
            (k, v)
        })
        .collect();
    let server = Server::start(ServerOpts {
        bare: true,
        args,
        env,
        admin: true,
        secret: None,
        api_keys: Vec::new(),
        ..Default::default()
    });
    let health = http_get(server.public, "/health").await;
    assert_eq!(health.status, 200, "{}", health.text());
    let publish = http_post_key(
        server.backend(),
        "/publish",
        "k2",
        &publish_body("news", "e", "1"),
    )
    .await;
    assert_eq!(publish.status, 200, "{}", publish.text());
    let metrics = http_get(server.backend(), "/metrics").await;
    assert_eq!(metrics.status, 200);
}

// ---------------------------------------------------------------------------------------------
// Compose
// ---------------------------------------------------------------------------------------------

fn compose() -> Value {
    let mut c = yaml(&read(&repo().join("deploy/compose.yaml")));
    c.apply_merge().expect("merge keys");
    c
}

/// `command:` as a list of words.
fn words(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("command as a list: {v:?}"))
        .iter()
        .map(|w| s(w).to_string())
        .collect()
}

#[test]
fn compose_runs_two_nodes_on_redis_behind_nginx() {
    let c = compose();
    let services = c["services"].as_mapping().expect("services");
    let mut names: Vec<&str> = services.keys().map(s).collect();
    names.sort();
    assert_eq!(names, ["broadcaster-1", "broadcaster-2", "nginx", "redis"]);

    let redis = words(&c["services"]["redis"]["command"]);
    let flag = |f: &str| redis[redis.iter().position(|w| w == f).unwrap() + 1].clone();
    let redis_url = format!("redis://{}:{}", flag("--bind"), flag("--port"));

    let nginx_conf = read(&repo().join("deploy/nginx.conf"));
    let upstream = &nginx_conf[nginx_conf.find("upstream broadcaster {").unwrap()..];
    let upstream = &upstream[..upstream.find('}').unwrap()];

    let shipped_profile = read(&repo().join("tuning/seccomp.json"));
    for node in ["broadcaster-1", "broadcaster-2"] {
        let n = &c["services"][node];
        assert_eq!(n["image"], "broadcaster:latest", "{node}");
        assert_eq!(n["network_mode"], "host", "{node}");
        let env = &n["environment"];
        assert_eq!(env["BROADCASTER_REDIS_URL"], redis_url.as_str(), "{node}");
        assert!(s(&env["BROADCASTER_AUTH_JWT_SECRET"]).contains("${BROADCASTER_AUTH_JWT_SECRET"));
        assert!(s(&env["BROADCASTER_AUTH_API_KEYS"]).contains("${BROADCASTER_AUTH_API_KEYS"));
        let profile: Vec<&str> = n["security_opt"]
            .as_sequence()
            .expect("security_opt")
            .iter()
            .filter_map(|o| s(o).strip_prefix("seccomp="))
            .collect();
        assert_eq!(profile.len(), 1, "{node}: one seccomp profile");
        // Compose resolves the path against the file's directory.
        assert_eq!(
            read(&repo().join("deploy").join(profile[0])),
            shipped_profile
        );
        let nofile = &n["ulimits"]["nofile"];
        assert!(nofile["soft"].as_u64().unwrap() >= 1_048_576, "{node}");
        assert_eq!(nofile["soft"], nofile["hard"], "{node}");
        let cmd = words(&n["command"]);
        assert_eq!(cmd[0], "serve");
        let listen = &cmd[cmd.iter().position(|w| w == "--listen").unwrap() + 1];
        assert!(
            upstream.contains(&format!("server {listen};")),
            "nginx's upstream lacks {node} at {listen}"
        );
        assert!(
            env["BROADCASTER_LIMITS_TRUSTED_PROXIES"] == "127.0.0.1",
            "{node} must trust nginx on loopback"
        );
    }
    let nginx = &c["services"]["nginx"];
    assert!(nginx["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .any(|v| s(v).starts_with("./nginx.conf:/etc/nginx/nginx.conf")));
}

/// deploy/nginx.conf serves the shipped locations, line for line, and nginx accepts it.
#[test]
fn compose_nginx_conf_has_the_shipped_locations_and_passes_nginx_t() {
    let lines = |t: &str| -> Vec<String> {
        t.lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    };
    let shipped = read(&repo().join("tuning/nginx-location.conf"));
    let locations = lines(&shipped[shipped.find("location /ws {").unwrap()..]);
    let conf_text = read(&repo().join("deploy/nginx.conf"));
    let conf = lines(&conf_text);
    assert!(
        conf.windows(locations.len()).any(|w| w == locations),
        "deploy/nginx.conf must hold tuning/nginx-location.conf's locations verbatim"
    );

    let bin = if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx".to_string()
    } else {
        "nginx".to_string()
    };
    let dir = temp_path("-nginx-t");
    std::fs::create_dir_all(&dir).unwrap();
    // The image's paths do not exist here: only the pid file needs one, and -t does not write it.
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, &conf_text).unwrap();
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("-t").arg("-p").arg(&dir).arg("-c").arg(&conf_path);
    let out = run_bounded(cmd, Duration::from_secs(30)).unwrap_or_else(|e| {
        panic!("cannot run {bin} ({e}): this test needs nginx (Debian package nginx)")
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn wait_listening(addr: std::net::SocketAddr, what: &str) {
    let deadline = std::time::Instant::now() + T;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The compose file's services as processes on this host, each with its own command and
/// environment (loopback ports moved to free ones; the secrets compose would take from the
/// shell filled in): a client through nginx receives what is published on either node.
#[tokio::test]
async fn compose_services_work_together_as_processes() {
    let c = compose();
    let dir = temp_path("-compose");
    std::fs::create_dir_all(&dir).unwrap();

    let redis_port = free_port().to_string();
    let mut redis_cmd = words(&c["services"]["redis"]["command"]);
    let p = redis_cmd.iter().position(|w| w == "--port").unwrap();
    let compose_redis_port = redis_cmd[p + 1].clone();
    redis_cmd[p + 1] = redis_port.clone();
    let mut cmd = std::process::Command::new(&redis_cmd[0]);
    cmd.args(&redis_cmd[1..])
        .current_dir(&dir)
        .stdout(std::process::Stdio::null());
    kill_with_parent(&mut cmd);
    let _redis = KillOnDrop(cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}): this test needs redis-server",
            redis_cmd[0]
        )
    }));
    wait_listening(
        format!("127.0.0.1:{redis_port}").parse().unwrap(),
        "redis-server",
    );

    let mut nodes = Vec::new();
    for node in ["broadcaster-1", "broadcaster-2"] {
        let n = &c["services"][node];
        let env: Vec<(String, String)> = n["environment"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let v = s(v);
                let v = if v.starts_with("${BROADCASTER_AUTH_JWT_SECRET") {
                    SECRET.to_string()
                } else if v.starts_with("${BROADCASTER_AUTH_API_KEYS") {
                    API_KEY.to_string()
                } else {
                    v.replace(&format!(":{compose_redis_port}"), &format!(":{redis_port}"))
                };
                (s(k).to_string(), v)
            })
            .collect();
        let mut args = words(&n["command"]);
        let l = args.iter().position(|w| w == "--listen").unwrap();
        let compose_listen = std::mem::replace(&mut args[l + 1], "127.0.0.1:0".into());
        args.extend(["--shards".into(), "1".into()]);
        let server = Server::start(ServerOpts {
            bare: true,
            args,
            env,
            secret: Some(SECRET.into()),
            api_keys: Vec::new(),
            ..Default::default()
        });
        nodes.push((compose_listen, server));
    }

    // nginx with deploy/nginx.conf, its upstream pointed at the nodes' ports.
    let nginx_port = free_port();
    let d = dir.display();
    let mut conf = read(&repo().join("deploy/nginx.conf"))
        .replace("listen 8080;", &format!("listen 127.0.0.1:{nginx_port};"))
        .replace("pid /tmp/nginx.pid;", &format!("pid {d}/nginx.pid;"))
        .replace(
            "http {\n",
            &format!(
                "http {{\n client_body_temp_path {d}/b;\n proxy_temp_path {d}/p;\n \
                 fastcgi_temp_path {d}/f;\n uwsgi_temp_path {d}/u;\n scgi_temp_path {d}/s;\n"
            ),
        );
    for (compose_listen, server) in &nodes {
        let from = format!("server {compose_listen};");
        assert!(conf.contains(&from), "no {from} in deploy/nginx.conf");
        conf = conf.replace(&from, &format!("server {};", server.public));
    }
    // One process (no workers), so that killing it leaves nothing behind.
    std::fs::write(
        dir.join("nginx.conf"),
        format!("daemon off;\nmaster_process off;\n{conf}"),
    )
    .unwrap();
    let bin = if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    };
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"));
    kill_with_parent(&mut cmd);
    let _nginx = KillOnDrop(
        cmd.spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin} ({e}): this test needs nginx")),
    );
    let front: std::net::SocketAddr = format!("127.0.0.1:{nginx_port}").parse().unwrap();
    wait_listening(front, "nginx");

    let health = http_get(front, "/health").await;
    assert_eq!(health.status, 200, "{}", health.text());
    let mut ws = Ws::connect(front).await;
    ws.auth_ok(
        &TokenSpec::new(SECRET, "alice")
            .channels(&["*"])
            .scope(&["subscribe"])
            .mint(),
    )
    .await;
    ws.subscribe("compose/news").await;
    // Backends publish to a node directly (nginx lets only 10.0.0.0/8 through): each node's
    // publication reaches the client, whichever node nginx chose for it.
    for (i, (_, server)) in nodes.iter().enumerate() {
        let r = http_post_key(
            server.public,
            "/publish",
            API_KEY,
            &publish_body("compose/news", "e", &i.to_string()),
        )
        .await;
        assert_eq!(r.status, 200, "publish on node {}: {}", i + 1, r.text());
        let b = within(T, "the broadcast through nginx", ws.recv_broadcast()).await;
        assert_eq!(b["payload"], i, "{b}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
