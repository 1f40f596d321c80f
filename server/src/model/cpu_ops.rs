//! Element-wise steps of a decode layer fused into one pass on the CPU.
//!
//! At decode batch sizes the per-op cost of ATen (dispatch, TensorIterator
//! set-up, allocation) is a large share of a step on the CPU: RMSNorm alone
//! runs as about six ops (square, mean, add, rsqrt, two multiplies), and the
//! SwiGLU activation as three. These do the same arithmetic in one loop over
//! the rows of a contiguous float32 CPU tensor; anything else (another
//! device or dtype, a strided view) returns `None` and the caller keeps the
//! ATen ops.

use tch::{Device, Kind, TchError, Tensor};

/// Rows `[M, H]` of `x` as a float32 CPU slice, when they are one.
fn rows(x: &Tensor) -> Option<(usize, usize)> {
    let size = x.size();
    (size.len() == 2 && super::is_cpu_f32(x)).then(|| (size[0] as usize, size[1] as usize))
}

/// `x * rsqrt(mean(x^2) + eps) * weight` over the last dimension of `x`
/// (`[M, H]`, `weight` `[H]`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>, TchError> {
    let Some((m, h)) = rows(x) else {
        return Ok(None);
    };
    if weight.size() != [h as i64] || weight.kind() != Kind::Float || !weight.is_contiguous() {
        return Ok(None);
    }
    let out = Tensor::f_empty([m as i64, h as i64], (Kind::Float, Device::Cpu))?;
    // SAFETY: contiguous float32 CPU tensors of the sizes checked above;
    // `out` is new, so it aliases neither input.
    let (src, w, dst) = unsafe {
        (
            std::slice::from_raw_parts(x.data_ptr() as *const f32, m * h),
            std::slice::from_raw_parts(weight.data_ptr() as *const f32, h),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, m * h),
        )
    };
    rms_norm_rows(src, w, eps as f32, dst);
    Ok(Some(out))
}

/// SwiGLU's `silu(gate) * up` for `gate_up` `[M, 2I]` (gate in the first
/// half of each row, up in the second); returns `[M, I]`.
pub fn silu_mul(gate_up: &Tensor) -> Result<Option<Tensor>, TchError> {
    let Some((m, width)) = rows(gate_up) else {
        return Ok(None);
    };
    if !width.is_multiple_of(2) {
        return Ok(None);
    }
    let i = width / 2;
    let out = Tensor::f_empty([m as i64, i as i64], (Kind::Float, Device::Cpu))?;
    // SAFETY: as in `rms_norm`.
    let (src, dst) = unsafe {
        (
            std::slice::from_raw_parts(gate_up.data_ptr() as *const f32, m * width),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, m * i),
        )
    };
    silu_mul_rows(src, i, dst);
    Ok(Some(out))
}

/// Rotary embedding, in place, of the first `heads` heads of every token's
/// row of `qkv` (`[tokens, all_heads * head_dim]`): token `i` is at
/// `positions[i]`, and `cos`/`sin` are the tables `[positions, head_dim]`
/// (`rope.rs`: `x * cos + roll(x, head_dim / 2) * sin`, the sign in `sin`).
/// Returns false, touching nothing, where the layout is not one it handles.
pub fn rope_in_place(
    qkv: &Tensor,
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    cos: &Tensor,
    sin: &Tensor,
) -> Result<bool, TchError> {
    let Some((m, width)) = rows(qkv) else {
        return Ok(false);
    };
    let Some((table_rows, table_width)) = rows(cos) else {
        return Ok(false);
    };
    if m != positions.len()
        || head_dim == 0
        || !head_dim.is_multiple_of(2)
        || heads * head_dim > width
        || table_width != head_dim
        || rows(sin) != Some((table_rows, table_width))
        || positions.iter().any(|&p| p >= table_rows)
    {
        return Ok(false);
    }
    // SAFETY: contiguous float32 CPU tensors of the sizes checked above;
    // the caller's `qkv` is a fresh projection output that nothing else
    // reads while this runs, and the tables are other tensors.
    let (x, c, s) = unsafe {
        (
            std::slice::from_raw_parts_mut(qkv.data_ptr() as *mut f32, m * width),
            std::slice::from_raw_parts(cos.data_ptr() as *const f32, table_rows * head_dim),
            std::slice::from_raw_parts(sin.data_ptr() as *const f32, table_rows * head_dim),
        )
    };
    rope_rows(x, width, heads, head_dim, positions, (c, s));
    Ok(true)
}

/// RMSNorm of each row of `src` (rows of `weight.len()`) into `dst`.
pub fn rms_norm_rows(src: &[f32], weight: &[f32], eps: f32, dst: &mut [f32]) {
    let h = weight.len().max(1);
    for (row, out_row) in src.chunks_exact(h).zip(dst.chunks_exact_mut(h)) {
        let sum: f32 = row.iter().map(|v| v * v).sum();
        let scale = 1.0 / ((sum / h as f32) + eps).sqrt();
        for ((o, v), g) in out_row.iter_mut().zip(row).zip(weight) {
            *o = v * scale * g;
        }
    }
}

/// `silu(gate) * up` of each row of `src` (`[gate | up]`, `2 * i` wide) into
/// the rows of `dst` (`i` wide).
pub fn silu_mul_rows(src: &[f32], i: usize, dst: &mut [f32]) {
    let i = i.max(1);
    for (row, out_row) in src.chunks_exact(2 * i).zip(dst.chunks_exact_mut(i)) {
        let (gate, up) = row.split_at(i);
        super::vec_exp::silu_mul(gate, up, out_row);
    }
}

/// Rotary embedding, in place, of the first `heads` heads of each row of `x`
/// (rows `width` wide): row `i` at `positions[i]`, with the tables `(cos,
/// sin)` `[positions, head_dim]`. Callers check that every position is in
/// the tables and `head_dim` is even.
pub fn rope_rows(
    x: &mut [f32],
    width: usize,
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    (cos, sin): (&[f32], &[f32]),
) {
    let half = head_dim / 2;
    let mut old = vec![0f32; head_dim];
    for (row, &p) in x.chunks_exact_mut(width).zip(positions) {
        let (c, s) = (
            &cos[p * head_dim..][..head_dim],
            &sin[p * head_dim..][..head_dim],
        );
        for head in row[..heads * head_dim].chunks_exact_mut(head_dim) {
            old.copy_from_slice(head);
            for j in 0..head_dim {
                head[j] = old[j] * c[j] + old[(j + half) % head_dim] * s[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &Tensor) -> bool {
        a.allclose(b, 1e-5, 1e-5, false)
    }

    #[test]
    fn rms_norm_matches_aten() {
        for (m, h) in [(1, 576), (3, 64), (16, 7)] {
            let x = Tensor::randn([m, h], (Kind::Float, Device::Cpu)) * 3.0;
            let w = Tensor::randn([h], (Kind::Float, Device::Cpu));
            let ours = rms_norm(&x, &w, 1e-5).unwrap().unwrap();
            let aten = x.rms_norm([h], Some(&w), 1e-5);
            assert!(close(&ours, &aten), "m={m} h={h}");
        }
    }

    #[test]
    fn silu_mul_matches_aten() {
        let gu = Tensor::randn([5, 2 * 48], (Kind::Float, Device::Cpu)) * 4.0;
        let ours = silu_mul(&gu).unwrap().unwrap();
        let halves = gu.chunk(2, -1);
        let aten = halves[0].silu() * &halves[1];
        assert!(close(&ours, &aten));
    }

    #[test]
    fn rope_in_place_matches_the_tensor_rotation() {
        let (tokens, heads, all, d) = (5, 3, 4, 8);
        let tables = Tensor::randn([16, d], (Kind::Float, Device::Cpu));
        let sin = Tensor::randn([16, d], (Kind::Float, Device::Cpu));
        let positions = [0, 3, 3, 7, 15];
        let qkv = Tensor::randn([tokens, all * d], (Kind::Float, Device::Cpu));
        let want = {
            let x = qkv.view([tokens, all, d]);
            let pos = Tensor::from_slice(&positions.map(|p| p as i64));
            let c = tables.index_select(0, &pos).view([tokens, 1, d]);
            let s = sin.index_select(0, &pos).view([tokens, 1, d]);
            let rotated =
                crate::model::rope::apply(&x.unsqueeze(0), &c.unsqueeze(0), &s.unsqueeze(0))
                    .unwrap()
                    .squeeze_dim(0);
            // Only the first `heads` heads turn; v (the rest) stays.
            Tensor::cat(
                &[rotated.narrow(1, 0, heads), x.narrow(1, heads, all - heads)],
                1,
            )
        };
        let ours = qkv.copy();
        assert!(
            rope_in_place(&ours, heads as usize, d as usize, &positions, &tables, &sin).unwrap()
        );
        assert!(close(&ours.view([tokens, all, d]), &want));
        // A position past the table, or a count that does not match: untouched.
        let same = qkv.copy();
        assert!(!rope_in_place(&same, 1, d as usize, &[0, 1, 2, 3, 16], &tables, &sin).unwrap());
        assert!(!rope_in_place(&same, 1, d as usize, &[0], &tables, &sin).unwrap());
        assert!(same.equal(&qkv));
    }

    #[test]
    fn other_layouts_are_left_to_aten() {
        let x = Tensor::randn([4, 6], (Kind::Float, Device::Cpu));
        let w = Tensor::ones([4], (Kind::Float, Device::Cpu));
        // A transposed view, a half-precision tensor, a weight of another width.
        assert!(rms_norm(&x.tr(), &w, 1e-5).unwrap().is_none());
        assert!(rms_norm(&x.to_kind(Kind::BFloat16), &w, 1e-5)
            .unwrap()
            .is_none());
        assert!(rms_norm(&x, &w, 1e-5).unwrap().is_none());
        assert!(silu_mul(&x.tr()).unwrap().is_none());
        assert!(silu_mul(&Tensor::randn([2, 5], (Kind::Float, Device::Cpu)))
            .unwrap()
            .is_none());
    }
}
