//! Random streams. Every sample index gets its own Xoshiro256++ stream derived
//! from the seed, so sample `i` is the same whatever the batch size, chunking
//! or thread count. A stream first yields the sample's start point (with a start time
//! `0 < t₀ < 1`, an anchor index, then D standard normals; otherwise the D normals of
//! `x₀`), then its Hutchinson probes (K·D values). Refinement draws from a second stream
//! per sample (`refine_stream`).
use rand::{RngCore, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rand_xoshiro::{SplitMix64, Xoshiro256PlusPlus};

use crate::trace::ProbeNoise;

/// The stream of sample `index` under `seed`: SplitMix64 mixes `(seed, index)` into
/// a 64-bit key, which seeds Xoshiro256++ (itself through SplitMix64).
pub fn sample_stream(seed: u64, index: u64) -> Xoshiro256PlusPlus {
    let mut mixer = SplitMix64::seed_from_u64(seed);
    let key = mixer.next_u64() ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut mixer = SplitMix64::seed_from_u64(key);
    Xoshiro256PlusPlus::seed_from_u64(mixer.next_u64())
}

/// The refinement stream of sample `index` (its HMC momenta and accept draws): a stream
/// apart from the sample's own, so refining never changes the sample it starts from.
pub fn refine_stream(seed: u64, index: u64) -> Xoshiro256PlusPlus {
    sample_stream(seed ^ 0x5EED_0F4E_F14E_u64, index)
}

/// A uniform index in `[0, n)` (n ≥ 1), unbiased (Lemire's method via `rand`).
pub fn index<R: RngCore>(rng: &mut R, n: usize) -> usize {
    use rand::Rng;
    rng.random_range(0..n)
}

/// A uniformly random permutation of `0..n` determined by `seed` alone (Fisher–Yates),
/// from a stream no sample uses (index `u64::MAX`).
pub fn permutation(seed: u64, n: usize) -> Vec<usize> {
    use rand::seq::SliceRandom;
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut sample_stream(seed, u64::MAX));
    order
}

pub fn fill_standard_normal<R: RngCore>(rng: &mut R, out: &mut [f32]) {
    for v in out {
        *v = StandardNormal.sample(rng);
    }
}

pub fn fill_probes<R: RngCore>(rng: &mut R, noise: ProbeNoise, out: &mut [f32]) {
    match noise {
        ProbeNoise::Gaussian => fill_standard_normal(rng, out),
        ProbeNoise::Rademacher => {
            // One random bit per entry, 64 entries per draw.
            for chunk in out.chunks_mut(64) {
                let bits = rng.next_u64();
                for (j, v) in chunk.iter_mut().enumerate() {
                    *v = if (bits >> j) & 1 == 1 { 1.0 } else { -1.0 };
                }
            }
        }
    }
}
