//! A LoRA delta on a few rows: `y[row] += scaling * (x[row] A^T) B^T` for each listed row, in
//! one pass over the factors, without building tensors.
//!
//! Why: an aLoRA call's tail and a decode step adapt 1-8 rows. Through candle, each adapted
//! projection was six tensor ops (select the rows, two matmuls, scale, add back), ~540 ops and
//! allocations a step for q/k/v over 30 layers: an adapted decode step of SmolLM2 at ~1,100
//! tokens of context took 17-26 ms against the base model's 12 ms, the factors' arithmetic being
//! ~0.8 M multiply-adds. Here the same work is two short loops per row (A^T is [in, rank], read
//! row by row; B^T is [rank, out], each of its rows an axpy into the delta).
//!
//! As PEFT, the delta is formed first (`t = x A^T`, then `d = t B^T * scaling`) and then added
//! to `y`; results agree with a matmul reference to f32 rounding (the sums run in another order).

use crate::error::{ensure, Result};
use crate::isa::Isa;

/// One projection's LoRA factors, transposed as the products read them.
#[derive(Debug, Clone, Copy)]
pub struct LoraFactors<'a> {
    /// A^T, [inp, rank] row-major.
    pub a_t: &'a [f32],
    /// B^T, [rank, out] row-major.
    pub b_t: &'a [f32],
    pub inp: usize,
    pub rank: usize,
    pub out: usize,
    pub scaling: f32,
}

/// Adds the delta of `f` to the rows `rows` of `y` ([N, out]), reading `x` ([N, inp]).
pub fn add_rows(y: &mut [f32], x: &[f32], rows: &[u32], f: LoraFactors<'_>) -> Result<()> {
    let LoraFactors { inp, rank, out, .. } = f;
    ensure(inp > 0 && out > 0 && rank > 0, || {
        format!("lora: empty shape inp {inp} rank {rank} out {out}")
    })?;
    ensure(
        f.a_t.len() == inp * rank && f.b_t.len() == rank * out,
        || {
            format!(
                "lora: A^T has {} elements, B^T {}; want {inp}x{rank} and {rank}x{out}",
                f.a_t.len(),
                f.b_t.len()
            )
        },
    )?;
    ensure(
        x.len().is_multiple_of(inp) && y.len().is_multiple_of(out),
        || {
            format!(
                "lora: x ({}) or y ({}) is not whole rows of {inp} / {out}",
                x.len(),
                y.len()
            )
        },
    )?;
    let n = x.len() / inp;
    ensure(y.len() / out == n, || {
        format!("lora: x has {n} rows, y {}", y.len() / out)
    })?;
    if let Some(r) = rows.iter().find(|&&r| r as usize >= n) {
        return Err(crate::KernelError::Shape(format!(
            "lora: row {r} of a {n}-row batch"
        )));
    }
    #[cfg(target_arch = "x86_64")]
    if Isa::has_avx2() {
        // SAFETY: AVX2 + FMA were detected; the body indexes only checked slices.
        unsafe { add_rows_avx2(y, x, rows, f) };
        return Ok(());
    }
    add_rows_body(y, x, rows, f);
    Ok(())
}

/// [`add_rows_body`] compiled for AVX2 + FMA, so its loops vectorise 8 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_rows_avx2(y: &mut [f32], x: &[f32], rows: &[u32], f: LoraFactors<'_>) {
    add_rows_body(y, x, rows, f)
}

/// The loops, shapes already checked.
#[inline(always)]
fn add_rows_body(y: &mut [f32], x: &[f32], rows: &[u32], f: LoraFactors<'_>) {
    let LoraFactors {
        a_t,
        b_t,
        inp,
        rank,
        out,
        scaling,
    } = f;
    let mut t = vec![0f32; rank];
    let mut delta = vec![0f32; out];
    for &row in rows {
        let row = row as usize;
        let xr = &x[row * inp..(row + 1) * inp];
        t.fill(0.0);
        for (xi, a) in xr.iter().zip(a_t.chunks_exact(rank)) {
            for (tj, aj) in t.iter_mut().zip(a) {
                *tj += xi * aj;
            }
        }
        delta.fill(0.0);
        for (tj, b) in t.iter().zip(b_t.chunks_exact(out)) {
            for (d, bo) in delta.iter_mut().zip(b) {
                *d += tj * bo;
            }
        }
        for (yo, d) in y[row * out..(row + 1) * out].iter_mut().zip(&delta) {
            *yo += d * scaling;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let v = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (v % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The matmul definition in f64: y + scaling * (x A^T) B^T on the listed rows.
    fn reference(y: &[f32], x: &[f32], rows: &[u32], f: LoraFactors<'_>) -> Vec<f64> {
        let mut out: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        for &r in rows {
            let r = r as usize;
            for o in 0..f.out {
                let mut d = 0f64;
                for j in 0..f.rank {
                    let t: f64 = (0..f.inp)
                        .map(|i| x[r * f.inp + i] as f64 * f.a_t[i * f.rank + j] as f64)
                        .sum();
                    d += t * f.b_t[j * f.out + o] as f64;
                }
                out[r * f.out + o] += d * f.scaling as f64;
            }
        }
        out
    }

    #[test]
    fn matches_the_matmul_definition_on_the_listed_rows_only() {
        for (inp, rank, out, n, rows) in [
            (576, 8, 192, 3, vec![1u32, 2]),
            (64, 16, 576, 5, vec![0, 1, 2, 3, 4]),
            (7, 1, 3, 2, vec![1]),
        ] {
            let (a_t, b_t) = (fill(inp * rank, 1), fill(rank * out, 2));
            let x = fill(n * inp, 3);
            let y0 = fill(n * out, 4);
            let f = LoraFactors {
                a_t: &a_t,
                b_t: &b_t,
                inp,
                rank,
                out,
                scaling: 4.0,
            };
            let want = reference(&y0, &x, &rows, f);
            let mut y = y0.clone();
            add_rows(&mut y, &x, &rows, f).unwrap();
            for (i, (g, w)) in y.iter().zip(&want).enumerate() {
                let tol = 1e-4 * (1.0 + w.abs());
                assert!((*g as f64 - w).abs() <= tol, "{i}: {g} vs {w}");
                if !rows.contains(&((i / out) as u32)) {
                    assert_eq!(*g, y0[i], "row {} is not listed", i / out);
                }
            }
            let mut p = y0.clone();
            add_rows_body(&mut p, &x, &rows, f);
            for (g, w) in p.iter().zip(&want) {
                assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()));
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        let (a_t, b_t) = (vec![0f32; 6], vec![0f32; 6]);
        let f = LoraFactors {
            a_t: &a_t,
            b_t: &b_t,
            inp: 3,
            rank: 2,
            out: 3,
            scaling: 1.0,
        };
        let (x, mut y) = (vec![0f32; 6], vec![0f32; 6]);
        assert!(add_rows(&mut y, &x, &[1], f).is_ok());
        let e = add_rows(&mut y, &x, &[2], f).unwrap_err().to_string();
        assert!(e.contains("row 2 of a 2-row batch"), "{e}");
        let e = add_rows(&mut y[..5], &x, &[0], f).unwrap_err().to_string();
        assert!(e.contains("whole rows"), "{e}");
        let bad = LoraFactors { rank: 3, ..f };
        assert!(add_rows(&mut y, &x, &[0], bad).is_err());
    }
}
