//! From per-frame probabilities to a steady decision: smoothing over time,
//! then thresholds with hysteresis, so that one odd frame does not flip an
//! output.

use std::collections::VecDeque;

/// How per-frame probabilities are combined over time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Smoothing {
    /// Each frame on its own.
    None,
    /// Exponential moving average of the probabilities:
    /// `s ← alpha·p + (1 − alpha)·s`. Smaller `alpha` is steadier.
    Ema {
        /// Weight of the newest frame, in `(0, 1]`.
        alpha: f32,
    },
    /// The label that is top-1 in most of the last `k` frames; its
    /// confidence is its mean probability over those frames.
    Majority {
        /// Window length, at least 1.
        k: usize,
    },
}

impl Smoothing {
    /// Parses `none`, `ema:ALPHA` or `majority:K`.
    pub fn parse(s: &str) -> Result<Smoothing, String> {
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "none" if arg.is_empty() => Ok(Smoothing::None),
            "ema" => {
                let alpha: f32 = arg.parse().map_err(|_| format!("`{s}`: ALPHA in ema:ALPHA must be a number"))?;
                if !(alpha > 0.0 && alpha <= 1.0) {
                    return Err(format!("`{s}`: ALPHA must be in (0, 1]"));
                }
                Ok(Smoothing::Ema { alpha })
            }
            "majority" => {
                let k: usize = arg.parse().map_err(|_| format!("`{s}`: K in majority:K must be a whole number"))?;
                if k == 0 {
                    return Err(format!("`{s}`: K must be at least 1"));
                }
                Ok(Smoothing::Majority { k })
            }
            _ => Err(format!("`{s}`: expected none, ema:ALPHA or majority:K")),
        }
    }
}

/// The running state of a [`Smoothing`].
#[derive(Debug, Clone)]
pub struct Smoother {
    kind: Smoothing,
    ema: Vec<f32>,
    window: VecDeque<Vec<f32>>,
}

impl Smoother {
    /// A smoother with no history.
    pub fn new(kind: Smoothing) -> Smoother {
        Smoother { kind, ema: Vec::new(), window: VecDeque::new() }
    }

    /// Forgets the history (after a model change).
    pub fn reset(&mut self) {
        self.ema.clear();
        self.window.clear();
    }

    /// Adds one frame's label probabilities and returns the smoothed ones.
    /// A frame with a different number of labels than the history restarts
    /// the history.
    pub fn update(&mut self, p: &[f32]) -> Vec<f32> {
        match self.kind {
            Smoothing::None => p.to_vec(),
            Smoothing::Ema { alpha } => {
                if self.ema.len() != p.len() {
                    self.ema = p.to_vec();
                } else {
                    for (s, &x) in self.ema.iter_mut().zip(p) {
                        *s = alpha * x + (1.0 - alpha) * *s;
                    }
                }
                self.ema.clone()
            }
            Smoothing::Majority { k } => {
                if self.window.front().is_some_and(|f| f.len() != p.len()) {
                    self.window.clear();
                }
                if self.window.len() == k {
                    self.window.pop_front();
                }
                self.window.push_back(p.to_vec());
                let mut votes = vec![0usize; p.len()];
                for f in &self.window {
                    if let Some(i) = argmax(f) {
                        votes[i] += 1;
                    }
                }
                // Ties go to the label seen most recently as top-1, so the
                // newest frame decides between equals.
                let newest_first: Vec<usize> = self.window.iter().rev().filter_map(|f| argmax(f)).collect();
                let most = votes.iter().copied().max().unwrap_or(0);
                let winner = newest_first.iter().copied().find(|&i| votes[i] == most);
                // Output: the winner gets its mean probability, the others
                // their mean scaled so that the winner stays the argmax.
                let n = self.window.len() as f32;
                let mut mean = vec![0f32; p.len()];
                for f in &self.window {
                    for (m, &x) in mean.iter_mut().zip(f) {
                        *m += x / n;
                    }
                }
                if let Some(w) = winner {
                    let top = mean[w];
                    for (i, m) in mean.iter_mut().enumerate() {
                        if i != w && *m >= top {
                            *m = top * 0.999;
                        }
                    }
                }
                mean
            }
        }
    }
}

/// Index of the largest value (the first of equals); `None` when empty or
/// all NaN.
pub fn argmax(p: &[f32]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &x) in p.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if best.is_none_or(|b| x > p[b]) {
            best = Some(i);
        }
    }
    best
}

/// Thresholds with hysteresis: a label becomes active when its smoothed
/// confidence reaches `on`, and stays active until it falls below `off`
/// (or another label reaches `on` and beats it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hysteresis {
    /// Confidence needed to become active.
    pub on: f32,
    /// Confidence under which the active label is released; `off <= on`.
    pub off: f32,
}

impl Default for Hysteresis {
    fn default() -> Self {
        Hysteresis { on: 0.6, off: 0.4 }
    }
}

impl Hysteresis {
    /// Checks `0 <= off <= on <= 1`.
    pub fn new(on: f32, off: f32) -> Result<Hysteresis, String> {
        if !(0.0..=1.0).contains(&on) || !(0.0..=1.0).contains(&off) || off > on {
            return Err(format!("thresholds on {on} / off {off}: need 0 <= off <= on <= 1"));
        }
        Ok(Hysteresis { on, off })
    }
}

/// The decision after one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The active label, if any.
    pub active: Option<usize>,
    /// Smoothed confidence of the active label (or of the best label when
    /// none is active).
    pub confidence: f32,
    /// The label with the highest smoothed confidence this frame.
    pub best: Option<usize>,
    /// Whether `active` changed with this frame.
    pub changed: bool,
    /// The active label before this frame.
    pub previous: Option<usize>,
}

/// The running state of a [`Hysteresis`].
#[derive(Debug, Clone)]
pub struct Gate {
    th: Hysteresis,
    active: Option<usize>,
}

impl Gate {
    /// A gate with no active label.
    pub fn new(th: Hysteresis) -> Gate {
        Gate { th, active: None }
    }

    /// The active label.
    pub fn active(&self) -> Option<usize> {
        self.active
    }

    /// Releases the active label (after a model change).
    pub fn reset(&mut self) {
        self.active = None;
    }

    /// Takes one frame's smoothed probabilities.
    pub fn update(&mut self, s: &[f32]) -> Decision {
        let previous = self.active;
        let best = argmax(s);
        let conf = |i: usize| s.get(i).copied().filter(|x| !x.is_nan()).unwrap_or(0.0);
        // The active label is lost if it no longer exists or fell below `off`.
        if let Some(a) = self.active {
            if a >= s.len() || conf(a) < self.th.off {
                self.active = None;
            }
        }
        if let Some(b) = best {
            let beats_active = match self.active {
                None => true,
                Some(a) => b != a && conf(b) > conf(a),
            };
            if beats_active && conf(b) >= self.th.on {
                self.active = Some(b);
            }
        }
        let confidence = self.active.or(best).map_or(0.0, conf);
        Decision { active: self.active, confidence, best, changed: self.active != previous, previous }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(labels: &[usize], n: usize) -> Vec<Vec<f32>> {
        labels
            .iter()
            .map(|&l| {
                let mut p = vec![0.02; n];
                p[l] = 1.0 - 0.02 * (n - 1) as f32;
                p
            })
            .collect()
    }

    fn run(smoothing: Smoothing, labels: &[usize]) -> Vec<Option<usize>> {
        let mut sm = Smoother::new(smoothing);
        let mut gate = Gate::new(Hysteresis::default());
        frames(labels, 3).iter().map(|p| gate.update(&sm.update(p)).active).collect()
    }

    #[test]
    fn a_one_frame_flicker_is_suppressed_by_both_smoothers() {
        let input = [0, 0, 0, 0, 1, 0, 0, 0];
        for s in [Smoothing::Ema { alpha: 0.3 }, Smoothing::Majority { k: 3 }] {
            let out = run(s, &input);
            assert!(out.iter().all(|&a| a == Some(0)), "{s:?}: {out:?}");
        }
        // Without smoothing the flicker goes through.
        assert_eq!(run(Smoothing::None, &input)[4], Some(1));
    }

    #[test]
    fn a_lasting_change_goes_through() {
        let input = [0, 0, 0, 1, 1, 1, 1, 1, 1];
        for s in [Smoothing::Ema { alpha: 0.5 }, Smoothing::Majority { k: 3 }] {
            let out = run(s, &input);
            assert_eq!(out.first(), Some(&Some(0)), "{s:?}");
            assert_eq!(out.last(), Some(&Some(1)), "{s:?}: {out:?}");
            // Once switched, it does not switch back.
            let first_one = out.iter().position(|&a| a == Some(1)).unwrap();
            assert!(out[first_one..].iter().all(|&a| a == Some(1)), "{s:?}: {out:?}");
        }
    }

    #[test]
    fn hysteresis_holds_between_the_thresholds() {
        let mut gate = Gate::new(Hysteresis::new(0.7, 0.4).unwrap());
        assert_eq!(gate.update(&[0.65, 0.35]).active, None, "below `on`: not yet active");
        let d = gate.update(&[0.75, 0.25]);
        assert_eq!((d.active, d.changed), (Some(0), true));
        // Between off and on: stays.
        let d = gate.update(&[0.5, 0.5]);
        assert_eq!((d.active, d.changed), (Some(0), false));
        let d = gate.update(&[0.45, 0.55]);
        assert_eq!(d.active, Some(0), "the other label is ahead but under `on`");
        let d = gate.update(&[0.3, 0.7]);
        assert_eq!((d.active, d.changed, d.previous), (Some(1), true, Some(0)));
        let d = gate.update(&[0.35, 0.35]);
        assert_eq!((d.active, d.changed), (None, true));
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        let mut gate = Gate::new(Hysteresis::default());
        assert_eq!(gate.update(&[]).active, None);
        assert_eq!(gate.update(&[f32::NAN, 0.9]).active, Some(1));
        assert_eq!(gate.update(&[0.9]).active, Some(0), "fewer labels after a reload");
        let mut sm = Smoother::new(Smoothing::Majority { k: 2 });
        sm.update(&[0.1, 0.9]);
        assert_eq!(sm.update(&[0.2, 0.3, 0.5]).len(), 3);
    }

    #[test]
    fn parse() {
        assert_eq!(Smoothing::parse("ema:0.25"), Ok(Smoothing::Ema { alpha: 0.25 }));
        assert_eq!(Smoothing::parse("majority:5"), Ok(Smoothing::Majority { k: 5 }));
        assert_eq!(Smoothing::parse("none"), Ok(Smoothing::None));
        for bad in ["ema:0", "ema:1.5", "ema:x", "majority:0", "median:3", ""] {
            assert!(Smoothing::parse(bad).is_err(), "{bad}");
        }
        assert!(Hysteresis::new(0.4, 0.6).is_err());
    }
}
