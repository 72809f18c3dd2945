//! Flags of `run` for regions of interest and Home Assistant discovery,
//! flattened into [`super::run::Args`].

use anyhow::Result;
use tern_device::ha::{default_node_id, HaDiscovery};
use tern_device::mqtt::MqttTarget;
use tern_device::roi::Region;

/// Regions of interest.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RoiArgs {
    /// A region of the frame classified on its own, with its own smoothing,
    /// events, GPIO rules (`--gpio NAME:LABEL=LINE`) and MQTT state topic:
    /// `NAME=x,y,w,h` in pixels (repeatable). NAME: 1-32 of A-Z a-z 0-9 _ -.
    #[arg(long = "roi", value_name = "NAME=x,y,w,h")]
    pub roi: Vec<String>,
}

impl RoiArgs {
    /// The regions, checked (names unique and topic-safe, sizes > 0).
    pub fn regions(&self) -> Result<Vec<Region>> {
        Region::parse_all(&self.roi)
    }
}

/// Home Assistant MQTT discovery.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct HaArgs {
    /// Announce Tern's entities to Home Assistant (MQTT discovery): a label
    /// sensor and one binary sensor per label (per region with --roi).
    #[arg(long, requires = "mqtt")]
    pub ha_discovery: bool,
    /// Home Assistant's discovery prefix.
    #[arg(long, value_name = "TOPIC", default_value = "homeassistant", requires = "ha_discovery")]
    pub ha_prefix: String,
    /// Node id in the discovery topics and unique ids (default: from
    /// --mqtt-client-id if given, else from the MQTT topic).
    #[arg(long, value_name = "ID", requires = "ha_discovery")]
    pub ha_node_id: Option<String>,
    /// The device's name in Home Assistant (default: the MQTT topic's last
    /// level).
    #[arg(long, value_name = "NAME", requires = "ha_discovery")]
    pub ha_name: Option<String>,
}

impl HaArgs {
    /// The discovery settings, or `None` without `--ha-discovery`.
    pub fn discovery(
        &self,
        target: &MqttTarget,
        client_id: Option<&str>,
        regions: &[Region],
    ) -> Result<Option<HaDiscovery>> {
        if !self.ha_discovery {
            return Ok(None);
        }
        let node_id = self.ha_node_id.clone().unwrap_or_else(|| default_node_id(client_id, &target.base));
        let name = match &self.ha_name {
            Some(n) => n.clone(),
            None => target.base.rsplit('/').next().unwrap_or(&target.base).to_owned(),
        };
        let regions = regions.iter().map(|r| r.name.clone()).collect();
        HaDiscovery::new(&self.ha_prefix, &node_id, &name, regions).map(Some)
    }
}
