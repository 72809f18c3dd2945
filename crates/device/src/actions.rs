//! Actuators: GPIO output pins that follow the active label, generic over
//! `embedded_hal::digital::OutputPin` so that tests drive mock pins and the
//! device drives `/dev/gpiochipN` lines ([`crate::gpio`]).
//!
//! With regions of interest ([`crate::roi`]) every rule names its region,
//! `REGION:LABEL=LINE`, and follows that region's active label.

use anyhow::{anyhow, bail, Context, Result};
use embedded_hal::digital::OutputPin;

use crate::events::{Event, FrameView, Sink};
use crate::smooth::Decision;

/// One `[REGION:]LABEL=LINE[@MIN_CONFIDENCE]` item of `--gpio`.
#[derive(Debug, Clone, PartialEq)]
pub struct PinRule {
    /// The region of interest whose label drives the pin (`None`: the
    /// whole frame).
    pub region: Option<String>,
    /// The label that drives the pin.
    pub label: String,
    /// GPIO line number on the chip.
    pub line: u32,
    /// Smoothed confidence needed to switch the pin on.
    pub min_confidence: f32,
}

/// Parses `cat=17,dog=27@0.8`: label `cat` drives line 17, label `dog`
/// drives line 27 once its confidence is at least 0.8.
pub fn parse_rules(s: &str) -> Result<Vec<PinRule>> {
    parse_rules_in(s, &[])
}

/// Parses `--gpio` for a run with the given regions of interest: with none,
/// as [`parse_rules`] (a `:` is part of the label); with some, every item
/// is `REGION:LABEL=LINE[@MIN]` and must name one of them, e.g.
/// `left:car=17,right:car=27`.
pub fn parse_rules_in(s: &str, regions: &[String]) -> Result<Vec<PinRule>> {
    let mut rules: Vec<PinRule> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (region, rule) = if regions.is_empty() {
            (None, item)
        } else {
            let (region, rule) = item.split_once(':').ok_or_else(|| {
                anyhow!("--gpio item {item:?}: with --roi, expected REGION:LABEL=LINE[@MIN] (regions: {regions:?})")
            })?;
            let region = region.trim();
            if !regions.iter().any(|r| r == region) {
                bail!("--gpio item {item:?}: no region {region:?} (--roi gives {regions:?})");
            }
            (Some(region.to_owned()), rule)
        };
        let (label, rest) =
            rule.rsplit_once('=').ok_or_else(|| anyhow!("--gpio item {item:?}: expected LABEL=LINE[@MIN]"))?;
        let (line, min) = match rest.split_once('@') {
            Some((l, m)) => (l, Some(m)),
            None => (rest, None),
        };
        let line: u32 =
            line.trim().parse().map_err(|_| anyhow!("--gpio item {item:?}: {line:?} is not a line number"))?;
        let min_confidence = match min {
            Some(m) => {
                let v: f32 = m.trim().parse().map_err(|_| anyhow!("--gpio item {item:?}: {m:?} is not a number"))?;
                if !(0.0..=1.0).contains(&v) {
                    bail!("--gpio item {item:?}: minimum confidence {v} is outside 0..=1");
                }
                v
            }
            None => 0.0,
        };
        let label = label.trim().to_owned();
        if label.is_empty() {
            bail!("--gpio item {item:?}: empty label");
        }
        if rules.iter().any(|r| r.line == line) {
            bail!("--gpio: line {line} is used twice");
        }
        rules.push(PinRule { region, label, line, min_confidence });
    }
    if rules.is_empty() {
        bail!("--gpio {s:?}: no LABEL=LINE items");
    }
    Ok(rules)
}

/// Checks that every rule names a label of the bundle.
pub fn check_labels(rules: &[PinRule], labels: &[String]) -> Result<()> {
    for r in rules {
        if !labels.iter().any(|l| l == &r.label) {
            let some: Vec<&str> = labels.iter().take(5).map(String::as_str).collect();
            bail!(
                "--gpio names label {:?}, which the bundle does not have (its {} labels start {:?})",
                r.label,
                labels.len(),
                some
            );
        }
    }
    Ok(())
}

struct Output<P> {
    rule: PinRule,
    pin: P,
    on: bool,
}

/// Pins that follow the active label: a pin is high while its label is the
/// active one, switched on only once the confidence reaches the rule's
/// minimum. Pins are written only when their state changes.
pub struct GpioOutputs<P: OutputPin> {
    outputs: Vec<Output<P>>,
}

impl<P: OutputPin> GpioOutputs<P> {
    /// Takes the pins, one per rule, and drives them all low.
    pub fn new(pins: Vec<(PinRule, P)>) -> Result<Self> {
        let mut outputs = Vec::with_capacity(pins.len());
        for (rule, mut pin) in pins {
            pin.set_low().map_err(|e| anyhow!("cannot set line {} low: {e:?}", rule.line))?;
            outputs.push(Output { rule, pin, on: false });
        }
        Ok(GpioOutputs { outputs })
    }

    /// Current state of each pin, by line.
    pub fn states(&self) -> Vec<(u32, bool)> {
        self.outputs.iter().map(|o| (o.rule.line, o.on)).collect()
    }

    /// Gives the pins back (e.g. to check mock expectations).
    pub fn into_pins(self) -> Vec<P> {
        self.outputs.into_iter().map(|o| o.pin).collect()
    }

    /// Applies one whole-frame decision.
    pub fn apply(&mut self, active: Option<&str>, confidence: f32) -> Result<()> {
        self.apply_in(None, active, confidence)
    }

    /// Applies one decision of `region` (`None`: the whole frame) to the
    /// pins whose rules name it.
    pub fn apply_in(&mut self, region: Option<&str>, active: Option<&str>, confidence: f32) -> Result<()> {
        for o in self.outputs.iter_mut().filter(|o| o.rule.region.as_deref() == region) {
            let is_active = active == Some(o.rule.label.as_str());
            // On needs the minimum; once on, the pin follows the hysteresis
            // of the active label so that it does not flicker at the minimum.
            let want = is_active && (o.on || confidence >= o.rule.min_confidence);
            if want != o.on {
                let r = if want { o.pin.set_high() } else { o.pin.set_low() };
                r.map_err(|e| anyhow!("cannot set line {} {}: {e:?}", o.rule.line, if want { "high" } else { "low" }))
                    .with_context(|| format!("GPIO for label {:?}", o.rule.label))?;
                o.on = want;
            }
        }
        Ok(())
    }

    /// Drives every pin low.
    pub fn all_low(&mut self) -> Result<()> {
        let mut first_error = None;
        for o in self.outputs.iter_mut().filter(|o| o.on) {
            match o.pin.set_low() {
                Ok(()) => o.on = false,
                Err(e) => {
                    first_error.get_or_insert_with(|| anyhow!("cannot set line {} low: {e:?}", o.rule.line));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl<P: OutputPin> Sink for GpioOutputs<P> {
    fn event(&mut self, _event: &Event) -> Result<()> {
        Ok(())
    }

    fn decision(&mut self, d: &Decision, labels: &[String]) -> Result<()> {
        let active = d.active.and_then(|i| labels.get(i)).map(String::as_str);
        self.apply(active, d.confidence)
    }

    fn frame(&mut self, view: &FrameView<'_>) -> Result<()> {
        // Whole-frame decisions come through `decision`.
        let Some(region) = view.region else { return Ok(()) };
        let active = view.decision.active.and_then(|i| view.labels.get(i)).map(String::as_str);
        self.apply_in(Some(region), active, view.decision.confidence)
            .with_context(|| format!("GPIO of region {region:?}"))
    }

    fn finish(&mut self) -> Result<()> {
        self.all_low()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        let r = parse_rules("cat=17, dog=27@0.8").unwrap();
        assert_eq!(r[0], PinRule { region: None, label: "cat".into(), line: 17, min_confidence: 0.0 });
        assert_eq!(r[1], PinRule { region: None, label: "dog".into(), line: 27, min_confidence: 0.8 });
        // A colon is part of the label without regions.
        assert_eq!(parse_rules("a:b=3").unwrap()[0].label, "a:b");
        let r = parse_rules("a=b=3").unwrap();
        assert_eq!(r[0].label, "a=b");
        for bad in ["", "cat", "cat=x", "=3", "cat=1@2", "cat=1@x", "cat=1,dog=1"] {
            assert!(parse_rules(bad).is_err(), "{bad}");
        }
        let labels = vec!["cat".to_string(), "dog".to_string()];
        check_labels(&parse_rules("cat=1").unwrap(), &labels).unwrap();
        let e = check_labels(&parse_rules("cow=1").unwrap(), &labels).unwrap_err();
        assert!(e.to_string().contains("cow"), "{e}");
    }

    #[test]
    fn rules_name_their_region_when_regions_are_set() {
        let regions = vec!["left".to_string(), "right".to_string()];
        let r = parse_rules_in("left:cat=17, right:cat=27@0.7", &regions).unwrap();
        assert_eq!(r[0], PinRule { region: Some("left".into()), label: "cat".into(), line: 17, min_confidence: 0.0 });
        assert_eq!(r[1], PinRule { region: Some("right".into()), label: "cat".into(), line: 27, min_confidence: 0.7 });
        for (bad, why) in
            [("cat=17", "REGION:LABEL"), ("middle:cat=17", "no region \"middle\""), ("left:a=1,right:b=1", "twice")]
        {
            let e = format!("{:#}", parse_rules_in(bad, &regions).unwrap_err());
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
