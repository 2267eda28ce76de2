//! `y = base + h Σ_j w_j k_j` over the f32 state: the solver's own arithmetic.
//!
//! Each stage input and each step's update touches every element of the `[B, D]` state
//! once per term. Done term by term, that is a pass over memory per term (the state of a
//! batch is larger than L1/L2 for big D); here the terms are applied block by block, so
//! `y` is read and written once and each `k_j` read once. The loop is compiled twice, for
//! baseline x86-64 and with AVX2, and the wider one is picked at run time. Both perform
//! the same IEEE operations in the same order (no FMA contraction), so results are
//! bitwise identical whichever runs.

/// Elements per block: `y`'s block plus one block of each term stay in L1.
const BLOCK: usize = 1024;
/// Most terms of any tableau row (Dormand–Prince has 7 stages).
const MAX_TERMS: usize = 8;

/// `y = base + h Σ_j w_j k_j` (or `y += h Σ_j w_j k_j` when `base` is `None`); zero
/// weights are skipped. Each `(h·w_j)` is rounded to f32 once, as the solver always has.
pub(crate) fn combine_into(y: &mut [f32], base: Option<&[f32]>, w: &[f64], h: f64, k: &[Vec<f32>]) {
    let mut terms: [(f32, &[f32]); MAX_TERMS] = [(0.0, &[]); MAX_TERMS];
    let mut n = 0;
    for (j, &wj) in w.iter().enumerate() {
        if wj != 0.0 {
            assert!(n < MAX_TERMS, "a tableau row has more than {MAX_TERMS} terms");
            terms[n] = ((h * wj) as f32, &k[j][..y.len()]);
            n += 1;
        }
    }
    if let Some(b) = base {
        assert_eq!(b.len(), y.len());
    }
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { blocks_avx2(y, base, &terms[..n]) };
            return;
        }
    }
    blocks(y, base, &terms[..n]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn blocks_avx2(y: &mut [f32], base: Option<&[f32]>, terms: &[(f32, &[f32])]) {
    blocks(y, base, terms)
}

#[inline(always)]
fn blocks(y: &mut [f32], base: Option<&[f32]>, terms: &[(f32, &[f32])]) {
    for (bi, yb) in y.chunks_mut(BLOCK).enumerate() {
        let lo = bi * BLOCK;
        let hi = lo + yb.len();
        if let Some(b) = base {
            yb.copy_from_slice(&b[lo..hi]);
        }
        for &(wj, kj) in terms {
            for (yv, kv) in yb.iter_mut().zip(&kj[lo..hi]) {
                *yv += wj * *kv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The term-by-term computation this replaces: copy, then one axpy per nonzero weight.
    fn reference(y: &mut [f32], base: Option<&[f32]>, w: &[f64], h: f64, k: &[Vec<f32>]) {
        if let Some(b) = base {
            y.copy_from_slice(b);
        }
        for (j, &wj) in w.iter().enumerate() {
            if wj != 0.0 {
                let hw = (h * wj) as f32;
                for (yv, kv) in y.iter_mut().zip(&k[j]) {
                    *yv += hw * *kv;
                }
            }
        }
    }

    #[test]
    fn bitwise_equal_to_term_by_term_for_every_length_and_row() {
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let rows: [&[f64]; 4] = [
            &[0.5],
            &[0.0, 0.5],
            &[1.0 / 6.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0],
            &[9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0],
        ];
        for len in [0, 1, 7, 8, 9, BLOCK - 1, BLOCK, BLOCK + 3, 3 * BLOCK + 17] {
            for row in rows {
                let k: Vec<Vec<f32>> = (0..row.len()).map(|_| (0..len).map(|_| next()).collect()).collect();
                let x: Vec<f32> = (0..len).map(|_| next()).collect();
                for base in [Some(&x[..]), None] {
                    let mut want = x.iter().map(|v| v * 2.0).collect::<Vec<f32>>();
                    let mut got = want.clone();
                    reference(&mut want, base, row, 0.05, &k);
                    combine_into(&mut got, base, row, 0.05, &k);
                    let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "len {len}, row {row:?}, base {}", base.is_some());
                }
            }
        }
    }
}
