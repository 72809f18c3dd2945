//! Home Assistant MQTT discovery (`--ha-discovery`): the retained config
//! messages that make Home Assistant create Tern's entities by itself.
//!
//! Each entity has one config message, `PREFIX/COMPONENT/NODE_ID/OBJECT_ID/config`
//! (Home Assistant's single-component discovery topic; `PREFIX` is
//! `homeassistant` by default), with a JSON payload:
//!
//! - a `sensor` whose state is the active label (`none` while no label is
//!   confident enough), read from the retained `BASE/state` message by a
//!   `value_template`; its attributes are that whole message
//!   (`json_attributes_topic`), so `confidence`, `frame` and `seq` show in
//!   Home Assistant;
//! - one `binary_sensor` per label, `ON` while that label is the active one
//!   (a `value_template` comparing `value_json.label` with the label as a
//!   JSON string literal, which Jinja reads alike), for bundles of at most
//!   [`MAX_BINARY_SENSORS`] labels;
//! - with regions of interest, the sensor and the binary sensors for each
//!   region instead, reading `BASE/REGION/state`.
//!
//! Every entity names the same `device` (identifiers `tern_NODE_ID`, model
//! `Tern`, the program's version) and `origin`, and points its availability
//! at `BASE/status`, which the sink keeps `online` while connected and the
//! broker turns `offline` (the last will) when the device drops off.

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::mqtt::MqttTarget;

/// Binary sensors are made for bundles of at most this many labels (per
/// region); beyond it only the label sensor is (an ImageNet bundle would
/// make a thousand entities).
pub const MAX_BINARY_SENSORS: usize = 64;

/// Longest node id.
pub const MAX_NODE_ID: usize = 64;

/// What discovery announces, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaDiscovery {
    /// Discovery prefix (`homeassistant`).
    pub prefix: String,
    /// Node id: the topic level under the component, and the root of every
    /// `unique_id`; `A-Z a-z 0-9 _ -` only.
    pub node_id: String,
    /// The device's name in Home Assistant.
    pub name: String,
    /// Regions of interest (empty: the whole frame).
    pub regions: Vec<String>,
}

/// One retained config message.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Its topic.
    pub topic: String,
    /// Its JSON payload.
    pub payload: Value,
}

/// `s` with every character outside `A-Z a-z 0-9 _ -` made `_`, at most
/// `max` characters.
fn sanitize(s: &str, max: usize) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).take(max).collect()
}

/// The default node id: the MQTT client id when one was given (it is
/// stable), else the topic base (`tern/kitchen-pi` → `tern_kitchen-pi`);
/// never the generated client id, which changes with every process.
pub fn default_node_id(client_id: Option<&str>, base: &str) -> String {
    let id = sanitize(client_id.unwrap_or(base), MAX_NODE_ID);
    if id.trim_matches('_').is_empty() {
        "tern".to_owned()
    } else {
        id
    }
}

impl HaDiscovery {
    /// Checks the prefix (one or more topic levels, no wildcards) and the
    /// node id.
    pub fn new(prefix: &str, node_id: &str, name: &str, regions: Vec<String>) -> Result<HaDiscovery> {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() || prefix.contains(['+', '#']) || prefix.split('/').any(str::is_empty) {
            bail!("--ha-prefix {prefix:?}: expected a topic such as homeassistant (no wildcards or empty levels)");
        }
        if node_id.is_empty()
            || node_id.len() > MAX_NODE_ID
            || !node_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            bail!("--ha-node-id {node_id:?}: expected 1 to {MAX_NODE_ID} characters of A-Z a-z 0-9 _ -");
        }
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            bail!("--ha-name {name:?}: expected a name without control characters");
        }
        Ok(HaDiscovery { prefix: prefix.to_owned(), node_id: node_id.to_owned(), name: name.to_owned(), regions })
    }

    /// Home Assistant's birth and last-will topic (`PREFIX/status`): an
    /// `online` there means Home Assistant (re)started, and the configs are
    /// sent again.
    pub fn status_topic(&self) -> String {
        format!("{}/status", self.prefix)
    }

    /// Whether binary sensors are made for `labels`.
    pub fn binary_sensors(labels: &[String]) -> bool {
        labels.len() <= MAX_BINARY_SENSORS
    }

    /// The config messages for a bundle with `labels`, publishing on
    /// `target`: sensors first, then binary sensors, region by region.
    pub fn configs(&self, target: &MqttTarget, labels: &[String]) -> Vec<Config> {
        let device = json!({
            "identifiers": [format!("tern_{}", self.node_id)],
            "name": self.name,
            "model": "Tern",
            "manufacturer": "Tern",
            "sw_version": env!("CARGO_PKG_VERSION"),
        });
        let origin = json!({ "name": "tern-device", "sw_version": env!("CARGO_PKG_VERSION") });
        let common = |mut v: Value| {
            if let Value::Object(o) = &mut v {
                o.insert("availability_topic".into(), Value::from(target.status_topic()));
                o.insert("payload_available".into(), Value::from("online"));
                o.insert("payload_not_available".into(), Value::from("offline"));
                o.insert("device".into(), device.clone());
                o.insert("origin".into(), origin.clone());
            }
            v
        };
        let label_ids = object_ids(labels);
        let regions: Vec<Option<&str>> =
            if self.regions.is_empty() { vec![None] } else { self.regions.iter().map(|r| Some(r.as_str())).collect() };
        let mut used: Vec<String> = Vec::new();
        let mut unique = |id: String| {
            let mut candidate = id.clone();
            let mut n = 2;
            while used.contains(&candidate) {
                candidate = format!("{id}_{n}");
                n += 1;
            }
            used.push(candidate.clone());
            candidate
        };
        let mut out = Vec::new();
        for region in &regions {
            let state_topic = target.state_topic_of(*region);
            let (object, name) = match region {
                None => ("label".to_owned(), "Label".to_owned()),
                Some(r) => (format!("{r}_label"), format!("{r} label")),
            };
            let object = unique(object);
            out.push(Config {
                topic: format!("{}/sensor/{}/{object}/config", self.prefix, self.node_id),
                payload: common(json!({
                    "name": name,
                    "unique_id": format!("{}_{object}", self.node_id),
                    "state_topic": state_topic,
                    "value_template": "{{ value_json.label if value_json.label is not none else 'none' }}",
                    "json_attributes_topic": state_topic,
                    "icon": "mdi:eye",
                })),
            });
        }
        if !HaDiscovery::binary_sensors(labels) {
            return out;
        }
        for region in &regions {
            let state_topic = target.state_topic_of(*region);
            for (label, id) in labels.iter().zip(&label_ids) {
                let (object, name) = match region {
                    None => (id.clone(), label.clone()),
                    Some(r) => (format!("{r}_{id}"), format!("{r} {label}")),
                };
                let object = unique(object);
                // A JSON string is a Jinja string literal with the same value.
                let literal = Value::from(label.as_str()).to_string();
                out.push(Config {
                    topic: format!("{}/binary_sensor/{}/{object}/config", self.prefix, self.node_id),
                    payload: common(json!({
                        "name": name,
                        "unique_id": format!("{}_{object}", self.node_id),
                        "state_topic": state_topic,
                        "value_template": format!("{{{{ 'ON' if value_json.label == {literal} else 'OFF' }}}}"),
                        "payload_on": "ON",
                        "payload_off": "OFF",
                    })),
                });
            }
        }
        out
    }
}

/// One object id per label: lower case, `_` for anything outside
/// `a-z 0-9 _ -`, at most 40 characters; `label_N` (N its index) when that
/// leaves nothing or repeats an earlier label's id.
fn object_ids(labels: &[String]) -> Vec<String> {
    let mut ids: Vec<String> = Vec::with_capacity(labels.len());
    for (i, l) in labels.iter().enumerate() {
        let id = sanitize(&l.to_lowercase(), 40);
        let id = if id.trim_matches('_').is_empty() || ids.contains(&id) { format!("label_{i}") } else { id };
        ids.push(id);
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> MqttTarget {
        MqttTarget::parse("mqtt://127.0.0.1:1883/tern/porch").unwrap()
    }

    fn labels(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn node_ids_are_stable_and_topic_safe() {
        assert_eq!(default_node_id(None, "tern/kitchen-pi"), "tern_kitchen-pi");
        assert_eq!(default_node_id(Some("my pi #2"), "tern/x"), "my_pi__2");
        assert_eq!(default_node_id(Some("///"), "tern/x"), "tern");
        assert!(HaDiscovery::new("homeassistant", "a b", "n", vec![]).is_err());
        assert!(HaDiscovery::new("home/#", "a", "n", vec![]).is_err());
        assert!(HaDiscovery::new("ha", "a", "", vec![]).is_err());
        assert_eq!(HaDiscovery::new("/ha/", "a", "n", vec![]).unwrap().prefix, "ha");
    }

    #[test]
    fn whole_frame_configs() {
        let ha = HaDiscovery::new("homeassistant", "tern_porch", "porch", vec![]).unwrap();
        let c = ha.configs(&target(), &labels(&["cat", "Dog \"Rex\"", "?", "cat!"]));
        let topics: Vec<&str> = c.iter().map(|c| c.topic.as_str()).collect();
        assert_eq!(
            topics,
            [
                "homeassistant/sensor/tern_porch/label/config",
                "homeassistant/binary_sensor/tern_porch/cat/config",
                "homeassistant/binary_sensor/tern_porch/dog__rex_/config",
                "homeassistant/binary_sensor/tern_porch/label_2/config",
                "homeassistant/binary_sensor/tern_porch/cat_/config",
            ]
        );
        let s = &c[0].payload;
        assert_eq!(s["state_topic"], "tern/porch/state");
        assert_eq!(s["json_attributes_topic"], "tern/porch/state");
        assert_eq!(s["availability_topic"], "tern/porch/status");
        assert_eq!(s["unique_id"], "tern_porch_label");
        assert_eq!(s["device"]["identifiers"][0], "tern_tern_porch");
        assert_eq!(s["device"]["model"], "Tern");
        let b = &c[2].payload;
        assert_eq!(b["name"], "Dog \"Rex\"");
        assert_eq!(b["value_template"], "{{ 'ON' if value_json.label == \"Dog \\\"Rex\\\"\" else 'OFF' }}");
        assert_eq!(c[1].payload["value_template"], "{{ 'ON' if value_json.label == \"cat\" else 'OFF' }}");
    }

    #[test]
    fn region_configs_and_the_binary_sensor_limit() {
        let ha = HaDiscovery::new("ha", "n", "n", vec!["left".into(), "right".into()]).unwrap();
        let c = ha.configs(&target(), &labels(&["car", "empty"]));
        let topics: Vec<&str> = c.iter().map(|c| c.topic.as_str()).collect();
        assert_eq!(
            topics,
            [
                "ha/sensor/n/left_label/config",
                "ha/sensor/n/right_label/config",
                "ha/binary_sensor/n/left_car/config",
                "ha/binary_sensor/n/left_empty/config",
                "ha/binary_sensor/n/right_car/config",
                "ha/binary_sensor/n/right_empty/config",
            ]
        );
        assert_eq!(c[1].payload["state_topic"], "tern/porch/right/state");
        assert_eq!(c[4].payload["name"], "right car");
        let many: Vec<String> = (0..MAX_BINARY_SENSORS + 1).map(|i| format!("l{i}")).collect();
        assert_eq!(ha.configs(&target(), &many).len(), 2);
        // Unique ids stay unique when a region and a label run together.
        let ha = HaDiscovery::new("ha", "n", "n", vec!["a".into(), "a_b".into()]).unwrap();
        let c = ha.configs(&target(), &labels(&["b_c", "c"]));
        let mut ids: Vec<&str> = c.iter().map(|c| c.payload["unique_id"].as_str().unwrap()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), c.len());
    }
}
