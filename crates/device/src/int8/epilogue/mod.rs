//! The requantization of a run of accumulators at once: 16 lanes a step in
//! NEON (four 4-lane vectors) or AVX2 (two 8-lane vectors), the lanes past
//! the last whole step by [`Requant::apply`]. Each vector step performs the
//! same f32 operations in the same order as [`Requant::apply`] (convert,
//! multiply, add the residual's product, bound, round half to even by the
//! ISA's conversion, add the zero point, clamp), none fused, so the two are
//! equal bit for bit (NEON saturates instead of bounding and clamping,
//! which gives the same int8: `neon`'s notes).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
pub(super) mod neon;

use super::Requant;


/// Lanes requantized together per vector step.
const STEP: usize = 16;

/// Which output channel each lane of a run is.
#[derive(Debug, Clone, Copy)]
pub(super) enum Lanes {
    /// Lane `j` is channel `c0 + j` (a channel-last run).
    Channels(usize),
    /// Every lane is channel `c` (a channel-first run).
    Channel(usize),
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The ISA of the vector epilogue on this CPU.
pub(super) fn isa() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "neon"
    } else if has_avx2() {
        "avx2"
    } else {
        "portable"
    }
}

impl Requant {
    /// `out[j] = self.apply(acc[j], channel of lane j, res[j])` for every
    /// lane (`res` absent: the residual reads as 0); the vector steps where
    /// this CPU has them.
    ///
    /// `acc`, `out` and `res` (when given) have one length, and the
    /// channels of the lanes are below the number of channels.
    pub(super) fn run(&self, acc: &[i32], lanes: Lanes, res: Option<&[i8]>, out: &mut [i8]) {
        self.run_with(acc, lanes, res, out, true)
    }

    /// [`Requant::run`], with the vector steps or (`vector` false) every
    /// lane by [`Requant::apply`].
    pub(super) fn run_with(&self, acc: &[i32], lanes: Lanes, res: Option<&[i8]>, out: &mut [i8], vector: bool) {
        let n = acc.len().min(out.len()).min(res.map_or(usize::MAX, |r| r.len()));
        let last = match lanes {
            Lanes::Channels(c0) => c0 + n,
            Lanes::Channel(c) => c + 1,
        };
        assert!(last <= self.bias.len() && last <= self.multiplier.len(), "lanes past the channels");
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "aarch64")]
        if vector {
            let k = neon::Consts::new(self);
            while done + STEP <= n {
                let p = self.params(lanes, done);
                // SAFETY: `done + STEP ≤ n` bounds the lanes read from `acc`, `res`
                // and written to `out`; `params` holds 16 of each or one.
                unsafe {
                    neon::requant16(&k, acc[done..].as_ptr(), p, res.map(|r| r[done..].as_ptr()), out[done..].as_mut_ptr())
                };
                done += STEP;
            }
        }
        #[cfg(target_arch = "x86_64")]
        if vector && has_avx2() {
            // SAFETY: AVX2 checked just above.
            let k = unsafe { avx2::Consts::new(self) };
            while done + STEP <= n {
                let p = self.params(lanes, done);
                // SAFETY: AVX2 checked; `done + STEP ≤ n` bounds the lanes of
                // `acc`, `res`, `out`; `params` holds 16 of each or one.
                unsafe {
                    avx2::requant16(&k, acc[done..].as_ptr(), p, res.map(|r| r[done..].as_ptr()), out[done..].as_mut_ptr())
                };
                done += STEP;
            }
        }
        let _ = vector;
        for j in done..n {
            let c = match lanes {
                Lanes::Channels(c0) => c0 + j,
                Lanes::Channel(c) => c,
            };
            out[j] = self.apply(acc[j], c, res.map_or(0, |r| r[j]));
        }
    }

    /// The multipliers and biases of lanes `j..j + STEP`.
    #[allow(dead_code)]
    fn params(&self, lanes: Lanes, j: usize) -> Params<'_> {
        match lanes {
            Lanes::Channels(c0) => Params::Row(&self.multiplier[c0 + j..][..STEP], &self.bias[c0 + j..][..STEP]),
            Lanes::Channel(c) => Params::One(self.multiplier[c], self.bias[c]),
        }
    }
}

/// The multipliers and biases of one vector step.
#[allow(dead_code)]
#[derive(Clone, Copy)]
enum Params<'a> {
    /// [`STEP`] of each, one per lane.
    Row(&'a [f32], &'a [i32]),
    /// One of each for every lane.
    One(f32, i32),
}
