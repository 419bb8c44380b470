//! `portcullis inject`: adds the sidecar to the user's own workloads.
//!
//! The sidecar goes in as a Kubernetes native sidecar (an init container
//! with `restartPolicy: Always`, 1.29+), so it is up before the app starts
//! and stops after it. What the user wrote is never moved: the sidecar is
//! appended to `initContainers`, volumes and annotations are appended, and
//! key order is preserved. A workload that already has the sidecar, or is
//! annotated `portcullis.dev/inject: disabled`, is left exactly as it was,
//! which makes injecting twice a no-op.

use serde::Deserialize;
use yaml_serde::{Mapping, Value};

pub const OPT_OUT: &str = "portcullis.dev/inject";
pub const INJECTED: &str = "portcullis.dev/injected";
pub const CONTAINER: &str = "portcullis";
pub const INBOUND_PORT: u16 = 15443;
pub const ADMIN_PORT: u16 = 15000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("document {document}: invalid YAML: {message}")]
    Yaml { document: usize, message: String },
    #[error("document {document} ({kind}): {message}")]
    Shape {
        document: usize,
        kind: String,
        message: String,
    },
}

/// Where the sidecar's SVID comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentitySource {
    /// cert-manager's csi-driver-spiffe writes tls.crt / tls.key / ca.crt
    /// into a CSI volume and rotates them in place.
    CertManager,
    /// The SPIFFE CSI driver mounts the SPIRE agent's Workload API socket.
    Spire,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub image: String,
    pub identity: IdentitySource,
    /// The ConfigMap holding `portcullis.toml`.
    pub config_map: String,
    /// The ConfigMap holding the Rego policies.
    pub policy_config_map: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            image: format!(
                "ghcr.io/portcullis-proxy/portcullis:{}",
                env!("CARGO_PKG_VERSION")
            ),
            identity: IdentitySource::CertManager,
            config_map: "portcullis-config".into(),
            policy_config_map: "portcullis-policies".into(),
        }
    }
}

/// Injects into every workload of a multi-document YAML stream and returns
/// the stream, one document per `---`.
pub fn inject(input: &str, opts: &Options) -> Result<String, Error> {
    let mut out = Vec::new();
    for (i, doc) in yaml_serde::Deserializer::from_str(input).enumerate() {
        let document = i + 1;
        let mut value = Value::deserialize(doc).map_err(|e| Error::Yaml {
            document,
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        inject_object(&mut value, opts, document)?;
        out.push(yaml_serde::to_string(&value).map_err(|e| Error::Yaml {
            document,
            message: e.to_string(),
        })?);
    }
    Ok(out.join("---\n"))
}

fn inject_object(obj: &mut Value, opts: &Options, document: usize) -> Result<(), Error> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let shape = |message: &str| Error::Shape {
        document,
        kind: kind.clone(),
        message: message.into(),
    };
    if opted_out(obj) {
        return Ok(());
    }
    let template = match kind.as_str() {
        "List" => {
            if let Some(items) = obj.get_mut("items").and_then(Value::as_sequence_mut) {
                for item in items {
                    inject_object(item, opts, document)?;
                }
            }
            return Ok(());
        }
        "Pod" => obj,
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => obj
            .get_mut("spec")
            .and_then(|s| s.get_mut("template"))
            .ok_or_else(|| shape("has no spec.template"))?,
        "CronJob" => obj
            .get_mut("spec")
            .and_then(|s| s.get_mut("jobTemplate"))
            .and_then(|s| s.get_mut("spec"))
            .and_then(|s| s.get_mut("template"))
            .ok_or_else(|| shape("has no spec.jobTemplate.spec.template"))?,
        // Services, ConfigMaps and the rest pass through untouched.
        _ => return Ok(()),
    };
    if opted_out(template) {
        return Ok(());
    }
    inject_pod(template, opts).map_err(|m| shape(&m))
}

fn opted_out(obj: &Value) -> bool {
    obj.get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(OPT_OUT))
        .and_then(Value::as_str)
        .is_some_and(|v| v.eq_ignore_ascii_case("disabled") || v.eq_ignore_ascii_case("false"))
}

/// Adds the sidecar to a Pod or a pod template (both have `metadata` and
/// `spec`).
fn inject_pod(pod: &mut Value, opts: &Options) -> Result<(), String> {
    let pod = pod
        .as_mapping_mut()
        .ok_or("the pod template is not a mapping")?;
    let spec = child_mapping(pod, "spec")?;
    let already = spec
        .get("initContainers")
        .and_then(Value::as_sequence)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.get("name").and_then(Value::as_str) == Some(CONTAINER))
        });
    if already {
        return Ok(());
    }
    child_sequence(spec, "initContainers")?.push(sidecar(opts)?);
    let volumes = child_sequence(spec, "volumes")?;
    for v in sidecar_volumes(opts) {
        let name = v.get("name").cloned();
        if !volumes
            .iter()
            .any(|existing| existing.get("name") == name.as_ref())
        {
            volumes.push(v);
        }
    }
    let metadata = child_mapping(pod, "metadata")?;
    let annotations = child_mapping(metadata, "annotations")?;
    for (k, v) in [
        (INJECTED, env!("CARGO_PKG_VERSION").to_string()),
        ("prometheus.io/scrape", "true".into()),
        ("prometheus.io/port", ADMIN_PORT.to_string()),
        ("prometheus.io/path", "/metrics".into()),
    ] {
        // An annotation the user set wins.
        if !annotations.contains_key(k) {
            annotations.insert(k.into(), v.into());
        }
    }
    Ok(())
}

fn child_mapping<'a>(m: &'a mut Mapping, key: &str) -> Result<&'a mut Mapping, String> {
    if !m.contains_key(key) || m.get(key).is_some_and(Value::is_null) {
        m.insert(key.into(), Value::Mapping(Mapping::new()));
    }
    m.get_mut(key)
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| format!("{key} is not a mapping"))
}

fn child_sequence<'a>(m: &'a mut Mapping, key: &str) -> Result<&'a mut Vec<Value>, String> {
    if !m.contains_key(key) || m.get(key).is_some_and(Value::is_null) {
        m.insert(key.into(), Value::Sequence(Vec::new()));
    }
    m.get_mut(key)
        .and_then(Value::as_sequence_mut)
        .ok_or_else(|| format!("{key} is not a list"))
}

/// The sidecar container, as YAML so it reads like the manifests in k8s/.
fn sidecar(opts: &Options) -> Result<Value, String> {
    let (identity_mount, identity_env) = match opts.identity {
        IdentitySource::CertManager => ("/var/run/secrets/spiffe.io", ""),
        IdentitySource::Spire => (
            "/spiffe-workload-api",
            "\n  - name: SPIFFE_ENDPOINT_SOCKET\n    value: unix:///spiffe-workload-api/spire-agent.sock",
        ),
    };
    let text = format!(
        r#"
name: {CONTAINER}
image: set below
imagePullPolicy: IfNotPresent
restartPolicy: Always
args: ["run", "--config", "/etc/portcullis/config/portcullis.toml"]
env:
  - name: PORTCULLIS_ADMIN_LISTEN
    value: "0.0.0.0:{ADMIN_PORT}"{identity_env}
ports:
  - name: portcullis-tls
    containerPort: {INBOUND_PORT}
    protocol: TCP
  - name: portcullis-adm
    containerPort: {ADMIN_PORT}
    protocol: TCP
startupProbe:
  httpGet: {{path: /readyz, port: portcullis-adm}}
  periodSeconds: 1
  failureThreshold: 60
readinessProbe:
  httpGet: {{path: /readyz, port: portcullis-adm}}
  periodSeconds: 5
livenessProbe:
  httpGet: {{path: /healthz, port: portcullis-adm}}
  periodSeconds: 10
  failureThreshold: 3
resources:
  requests: {{cpu: 100m, memory: 32Mi}}
  limits: {{cpu: "1", memory: 128Mi}}
securityContext:
  runAsNonRoot: true
  runAsUser: 65532
  runAsGroup: 65532
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{drop: [ALL]}}
  seccompProfile: {{type: RuntimeDefault}}
volumeMounts:
  - {{name: portcullis-config, mountPath: /etc/portcullis/config, readOnly: true}}
  - {{name: portcullis-policies, mountPath: /etc/portcullis/policies, readOnly: true}}
  - {{name: portcullis-identity, mountPath: {identity_mount}, readOnly: true}}
"#
    );
    let mut container: Value =
        yaml_serde::from_str(&text).map_err(|e| format!("sidecar template: {e}"))?;
    // Set as a value, not spliced into the text, so no image string can
    // change the YAML's structure.
    if let Some(m) = container.as_mapping_mut() {
        m.insert("image".into(), opts.image.clone().into());
    }
    Ok(container)
}

fn sidecar_volumes(opts: &Options) -> Vec<Value> {
    let identity = match opts.identity {
        IdentitySource::CertManager => {
            r#"
name: portcullis-identity
csi:
  driver: spiffe.csi.cert-manager.io
  readOnly: true
"#
        }
        IdentitySource::Spire => {
            r#"
name: portcullis-identity
csi:
  driver: csi.spiffe.io
  readOnly: true
"#
        }
    };
    let config = format!(
        "name: portcullis-config\nconfigMap:\n  name: {}\n",
        opts.config_map
    );
    let policies = format!(
        "name: portcullis-policies\nconfigMap:\n  name: {}\n",
        opts.policy_config_map
    );
    [config.as_str(), policies.as_str(), identity]
        .iter()
        .filter_map(|t| yaml_serde::from_str(t).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: payments
spec:
  selector:
    matchLabels: {app: payments}
  template:
    metadata:
      labels: {app: payments}
    spec:
      initContainers:
        - name: migrate
          image: payments:1
      containers:
        - name: app
          image: payments:1
"#;

    #[test]
    fn injects_after_the_users_init_containers_and_is_idempotent() {
        let once = inject(DEPLOYMENT, &Options::default()).unwrap();
        let v: Value = yaml_serde::from_str(&once).unwrap();
        let inits = v["spec"]["template"]["spec"]["initContainers"]
            .as_sequence()
            .unwrap();
        assert_eq!(inits[0]["name"], "migrate");
        assert_eq!(inits[1]["name"], CONTAINER);
        assert_eq!(inits[1]["restartPolicy"], "Always");
        assert_eq!(
            v["spec"]["template"]["spec"]["volumes"]
                .as_sequence()
                .unwrap()
                .len(),
            3
        );
        assert_eq!(inject(&once, &Options::default()).unwrap(), once);
    }

    #[test]
    fn opt_out_and_other_kinds_pass_through() {
        let opted = DEPLOYMENT.replace(
            "metadata:\n  name: payments\n",
            "metadata:\n  name: payments\n  annotations:\n    portcullis.dev/inject: disabled\n",
        );
        let out = inject(&opted, &Options::default()).unwrap();
        assert!(!out.contains("restartPolicy"), "{out}");
        let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\n";
        assert_eq!(inject(svc, &Options::default()).unwrap(), svc);
    }

    #[test]
    fn invalid_yaml_names_document_and_line() {
        let input = "kind: Service\n---\nkind: Pod\nspec: [\n";
        let err = inject(input, &Options::default()).unwrap_err().to_string();
        assert!(err.starts_with("document 2: invalid YAML"), "{err}");
        assert!(err.contains("line"), "{err}");
    }
}
